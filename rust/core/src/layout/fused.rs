//! Fused groups: all experts' gate/up in one tensor and their down in another.

use safetensors::tensor::Dtype;

use super::check::{entry, layout_error, same_dtype};
use super::layer::{ExpertTensors, FusedTensors, MoeLayer};
use super::naming::FUSED_NAMES;
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::quant::{self, Packing, Weights, MX_BLOCK};
use crate::shard::TensorEntry;

/// The fused group whose gate/up tensor is `name`, if `name` is one.
pub(super) fn fused_group(
    ckpt: &Checkpoint,
    name: &str,
    gate_up: &TensorEntry,
    interleaved: Option<bool>,
) -> Result<Option<MoeLayer>> {
    let Some((prefix, names)) = FUSED_NAMES.iter().find_map(|names| {
        let prefix = name.strip_suffix(names.gate_up)?.strip_suffix('.')?;
        Some((prefix, names))
    }) else {
        return Ok(None);
    };
    let mx = names.mx_scales.is_some();
    let interleaved = interleaved.unwrap_or(mx);
    if gate_up.shape.len() != if mx { 4 } else { 3 } {
        return Ok(None); // a dense (non-expert) fused MLP, e.g. Phi-3's `mlp.gate_up_proj.weight`
    }
    let err = |reason: String| layout_error(ckpt, prefix, reason);
    let down_name = format!("{prefix}.{}", names.down);
    let down = entry(ckpt, &down_name)
        .ok_or_else(|| err(format!("`{name}` has no companion `{down_name}`")))?;
    let (g, d) = (&gate_up.shape, &down.shape);
    if d.len() != g.len() || d[0] != g[0] {
        return Err(err(format!(
            "`{name}` {g:?} and `{down_name}` {d:?} do not describe the same experts"
        )));
    }
    if g.contains(&0) || d.contains(&0) {
        // An empty dimension would let the others be anything (their product is still 0).
        return Err(err(format!(
            "`{name}` {g:?} and `{down_name}` {d:?} have an empty dimension"
        )));
    }
    let dtype = same_dtype(ckpt, prefix, &[(name, gate_up), (&down_name, down)])?;
    // Values one stored element holds along the input dimension, and the shapes in values.
    let pack = if mx {
        if dtype != Dtype::U8 || g[3] * 2 != MX_BLOCK || d[3] != g[3] {
            return Err(err(format!(
                "`{name}` {g:?} and `{down_name}` {d:?} are {dtype}; mxfp4 blocks are U8 \
                 [E, rows, cols/{MX_BLOCK}, {}]",
                MX_BLOCK / 2
            )));
        }
        2
    } else {
        1
    };
    let values = |s: &[usize]| [s[0], s[1], s.iter().skip(2).product::<usize>() * pack];
    let (g, d) = (values(g), values(d));
    let twice = |n: usize| n.checked_mul(2);
    let normal = Some(g[1]) == twice(d[2]) && g[2] == d[1];
    // Packing runs along the input dimension, which is last: packed groups are never transposed.
    let transposed = pack == 1 && Some(g[2]) == twice(d[1]) && g[1] == d[2];
    let (hidden, inter) = match (normal, transposed) {
        (true, false) => (g[2], d[2]),
        (false, true) => (g[1], d[1]),
        _ => {
            return Err(err(format!(
                "cannot tell the orientation of `{name}` {:?} and `{down_name}` {:?}: expected \
                 [E, 2I, H] with [E, H, I], or [E, H, 2I] with [E, I, H]",
                gate_up.shape, down.shape
            )))
        }
    };
    let (num_experts, h, i) = (g[0], hidden, inter);

    let (gate_up_bias, down_bias, bias_dtype) = match names.biases {
        None => (None, None, None),
        Some((gb, db)) => {
            let (gb, db) = (format!("{prefix}.{gb}"), format!("{prefix}.{db}"));
            match (entry(ckpt, &gb), entry(ckpt, &db)) {
                (None, None) => (None, None, None),
                (Some(gbe), Some(dbe)) => {
                    if gbe.shape != [num_experts, 2 * i] || dbe.shape != [num_experts, h] {
                        return Err(err(format!(
                            "biases `{gb}` {:?} and `{db}` {:?} should be [{num_experts}, {}] and \
                             [{num_experts}, {h}]",
                            gbe.shape,
                            dbe.shape,
                            2 * i
                        )));
                    }
                    let dtype = same_dtype(ckpt, prefix, &[(&gb, gbe), (&db, dbe)])?;
                    (Some(gb), Some(db), Some(dtype))
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(err(format!("only one of `{gb}` and `{db}` is present")))
                }
            }
        }
    };
    let weights = Weights {
        prefix,
        hidden: h,
        inter: i,
        dtype,
        pack,
        packing: Packing::find(mx, pack),
        out_pack: 1,
        k_first: false,
    };
    let mx_scales = names
        .mx_scales
        .map(|(g, d)| (format!("{prefix}.{g}"), format!("{prefix}.{d}")));
    let quantization = quant::fused(
        ckpt,
        &weights,
        (name, &down_name),
        mx_scales,
        num_experts,
        (transposed, interleaved),
    )?;
    Ok(Some(MoeLayer {
        prefix: prefix.to_string(),
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype,
        pack,
        quantization,
        tensors: ExpertTensors::Fused(FusedTensors {
            gate_up: name.to_string(),
            down: down_name,
            gate_up_bias,
            down_bias,
            transposed,
            interleaved,
        }),
    }))
}
