//! Per-expert groups: one tensor per expert and matrix, found by grouping names by prefix
//! and naming scheme.

use std::collections::BTreeMap;

use super::check::{layout_error, same_dtype};
use super::layer::{ExpertTensors, MoeLayer, PerExpertTensors};
use super::naming::{
    is_experts_container, is_packed_weight, is_qweight, Naming, BIAS, NAMINGS, PACKED_WEIGHT,
    QWEIGHT, WEIGHT,
};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::quant::scheme::{bare_scale_kind, mx_packing, BARE_SCALE};
use crate::quant::{self, Found, Packing, PerExpertFound, Weights};
use crate::shard::TensorEntry;
use safetensors::tensor::Dtype;

/// What one expert of a per-expert candidate group holds.
#[derive(Default)]
pub(super) struct ExpertEntries<'c> {
    /// Weights `[0..3]` and biases `[3..6]`, in [`Part`] order.
    tensors: [Option<Found<'c>>; 6],
    /// Companions by kind, `[gate, up, down]`.
    companions: BTreeMap<&'static str, [Option<Found<'c>>; 3]>,
    /// Tensors of the group's scheme that no destination takes (GPTQ's `g_idx`), `[gate,
    /// up, down]`.
    discarded: [Option<Found<'c>>; 3],
    /// A tensor of a gate/up/down module that is neither weight, bias nor a known companion
    /// (`weight_scale_2`, `weight_zero_point`, `qweight`, ...): a scheme the loader does
    /// not know.
    foreign: bool,
}

pub(super) type ExpertNames<'c> = BTreeMap<usize, ExpertEntries<'c>>;

impl<'c> ExpertEntries<'c> {
    /// The weight scale of matrix `slot` where it may be an OCP MX one: `weight_scale`, or
    /// DeepSeek-V4's bare `scale`.
    fn mx_scale(&self, slot: usize) -> Option<Found<'c>> {
        ["weight_scale", BARE_SCALE]
            .iter()
            .find_map(|kind| self.companions.get(kind)?[slot])
    }

    /// Values per stored element of weight `t` of matrix `slot` where its scale makes it
    /// OCP MX (see [`mx_packing`]); never beside NVFP4's `weight_scale_2`.
    fn mx_pack(&self, slot: usize, t: &TensorEntry) -> Option<usize> {
        if self.companions.contains_key("weight_scale_2") {
            return None;
        }
        let (_, scale) = self.mx_scale(slot)?;
        mx_packing(t.dtype, &t.shape, scale.dtype, &scale.shape)
    }
}

/// Groups `P.{e}.{gate|up|down}.{weight|bias}` names by prefix and naming scheme.
pub(super) fn per_expert_candidates(
    ckpt: &Checkpoint,
) -> Vec<(String, &'static Naming, ExpertNames<'_>)> {
    let unloaded_config = quant::QuantConfig::unsupported(ckpt.config());
    let config = quant::QuantConfig::from_config(ckpt.config());
    let k_first = quant::k_first_packing(config.as_ref().map(|c| c.method.as_str()));
    let int_bits = config.and_then(|c| c.int_bits);
    let mut groups: BTreeMap<(String, usize), ExpertNames> = BTreeMap::new();
    for (name, entry) in ckpt.entries() {
        let mut parts = name.rsplitn(4, '.');
        let (Some(kind_name), Some(module), Some(expert), Some(prefix)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let kind = match kind_name {
            WEIGHT | PACKED_WEIGHT => Some(0),
            QWEIGHT if k_first.is_some() => Some(0),
            BIAS => Some(3),
            _ => None,
        };
        let discarded = k_first.is_some_and(|k| k.discarded.contains(&kind_name));
        // DeepSeek-V4's bare `scale` is a companion whose kind the weights decide.
        let companion = quant::companion_kind(kind_name)
            .map(|c| c.name)
            .or((kind_name == BARE_SCALE).then_some(BARE_SCALE));
        let Ok(expert) = expert.parse::<usize>() else {
            continue;
        };
        if !is_experts_container(prefix) {
            continue; // shared experts and other numbered modules are dense weights
        }
        for (n, naming) in NAMINGS.iter().enumerate() {
            let slot = [naming.gate, naming.up, naming.down]
                .iter()
                .position(|m| *m == module);
            if let Some(slot) = slot {
                let experts = groups.entry((prefix.to_string(), n)).or_default();
                let found = experts.entry(expert).or_default();
                match (kind, companion) {
                    (Some(kind), _) => found.tensors[kind + slot] = Some((name, entry)),
                    (None, Some(c)) => {
                        found.companions.entry(c).or_default()[slot] = Some((name, entry))
                    }
                    (None, None) if discarded => found.discarded[slot] = Some((name, entry)),
                    (None, None) => found.foreign = true,
                }
            }
        }
    }
    groups
        .into_iter()
        // A group must have at least one gate weight; a lone `0.linear.weight` elsewhere in a
        // model is not an expert group.
        .filter(|(_, experts)| experts.values().any(|e| e.tensors[0].is_some()))
        // Unknown tensors beside the weights, or integer weights (packed values), belong to
        // a quantization the loader does not know: `unsupported_groups` names them.
        // Scales under a quantization_config the loader does not load mean something else.
        .filter(|(_, experts)| {
            unloaded_config.is_none() || experts.values().all(|e| e.companions.is_empty())
        })
        .filter(|(_, experts)| {
            let packed = experts.values().any(|e| {
                quant::NVFP4_GLOBAL_SCALES
                    .iter()
                    .any(|k| e.companions.contains_key(k))
            });
            // Integer weights with scales beside them (or named `weight_packed`) pack values
            // as only a known scheme says; alone, they are plain data, loaded as stored.
            let scaled = experts.values().any(|e| !e.companions.is_empty());
            !experts.values().any(|e| {
                e.foreign
                    || e.tensors[..3].iter().enumerate().any(|(slot, found)| {
                        found.is_some_and(|(name, t)| {
                            let named = is_packed_weight(name) || is_qweight(name);
                            // int8 weights are named `weight`: their bits are the config's too.
                            let bits = (named || t.dtype == Dtype::I8)
                                .then_some(int_bits)
                                .flatten();
                            (scaled || named)
                                && e.mx_pack(slot, t).is_none()
                                && quant::packing(t.dtype, packed, bits).is_none()
                        })
                    })
            })
        })
        .map(|((prefix, n), experts)| (prefix, &NAMINGS[n], experts))
        .collect()
}

pub(super) fn per_expert_group(
    ckpt: &Checkpoint,
    prefix: String,
    naming: &'static Naming,
    experts: ExpertNames<'_>,
) -> Result<MoeLayer> {
    let err = |reason: String| layout_error(ckpt, &prefix, reason);
    let num_experts = experts.len();
    if let Some(missing) = (0..num_experts).find(|e| !experts.contains_key(e)) {
        let last = experts.keys().next_back().copied().unwrap_or(0);
        return Err(err(format!(
            "expert {missing} is missing (found {num_experts} experts numbered up to {last})"
        )));
    }
    let modules = [naming.gate, naming.up, naming.down];
    let has_bias = experts
        .values()
        .any(|e| e.tensors[3..].iter().any(Option::is_some));
    let kinds = if has_bias { 6 } else { 3 };
    // found[kind][expert], kinds in `Part` order
    let mut found: [Vec<(&str, &TensorEntry)>; 6] = Default::default();
    for (e, tensors) in &experts {
        for k in 0..kinds {
            let kind = if k < 3 { WEIGHT } else { BIAS };
            let tensor = tensors.tensors[k].ok_or_else(|| {
                err(format!(
                    "`{prefix}.{e}.{}.{kind}` is missing",
                    modules[k % 3]
                ))
            })?;
            found[k].push(tensor);
        }
    }
    let (first_name, first) = found[0][0];
    if first.shape.len() != 2 {
        return Err(err(format!(
            "`{first_name}` has shape {:?}; expected [I, H]",
            first.shape
        )));
    }
    let packed = experts.values().any(|e| {
        quant::NVFP4_GLOBAL_SCALES
            .iter()
            .any(|k| e.companions.contains_key(k))
    });
    let config = quant::QuantConfig::from_config(ckpt.config());
    let int_bits =
        (is_packed_weight(first_name) || is_qweight(first_name) || first.dtype == Dtype::I8)
            .then(|| config.as_ref()?.int_bits)
            .flatten();
    // GPTQ and AWQ store `[in, out]`: the `[out, in]` matrix transposed.
    let k_first = is_qweight(first_name)
        .then(|| quant::k_first_packing(config.as_ref().map(|c| c.method.as_str())))
        .flatten();
    // OCP MX weights are told by their scales (the first expert's gate decides; every
    // other tensor is checked against it below).
    let mx_pack = experts.values().next().and_then(|e| e.mx_pack(0, first));
    let values = mx_pack
        .or_else(|| quant::packing(first.dtype, packed, int_bits))
        .unwrap_or(1);
    let (pack, out_pack) = match k_first {
        Some(k) if k.packed_along_output => (1, values),
        _ => (values, 1),
    };
    let orient = |rows: usize, cols: usize| -> Vec<usize> {
        if k_first.is_some() {
            vec![cols, rows]
        } else {
            vec![rows, cols]
        }
    };
    let (stored_i, stored_h) = match k_first {
        Some(_) => (first.shape[1], first.shape[0]),
        None => (first.shape[0], first.shape[1]),
    };
    let (i, h) = (stored_i * out_pack, stored_h * pack);
    if i == 0 || h == 0 {
        return Err(err(format!(
            "`{first_name}` has shape {:?}: an expert cannot be empty",
            first.shape
        )));
    }
    if !i.is_multiple_of(pack) {
        return Err(err(format!(
            "`{first_name}` has {i} rows, which do not pack {pack} values a byte in down's rows"
        )));
    }
    if !h.is_multiple_of(out_pack) {
        return Err(err(format!(
            "`{first_name}` holds {h} inputs, which do not pack {out_pack} outputs an element \
             in down's outputs"
        )));
    }
    let (gate_shape, down_shape) = (
        orient(i / out_pack, stored_h),
        orient(h / out_pack, i / pack),
    );
    let expected: [&[usize]; 6] = [&gate_shape, &gate_shape, &down_shape, &[i], &[i], &[h]];
    for k in 0..kinds {
        if let Some((name, e)) = found[k].iter().find(|(_, e)| e.shape != expected[k]) {
            return Err(err(format!(
                "`{name}` has shape {:?}; expected {:?} like `{first_name}`",
                e.shape, expected[k]
            )));
        }
    }
    fn entries<'c>(kinds: &[Vec<(&'c str, &'c TensorEntry)>]) -> Vec<(&'c str, &'c TensorEntry)> {
        kinds.iter().flatten().copied().collect()
    }
    let dtype = same_dtype(ckpt, &prefix, &entries(&found[..3]))?;
    let bias_dtype = has_bias
        .then(|| same_dtype(ckpt, &prefix, &entries(&found[3..])))
        .transpose()?;
    let names = found.map(|tensors| {
        tensors
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<Vec<_>>()
    });
    let [g, u, d, gb, ub, db] = names;
    let mut discarded = Vec::new();
    let any_discarded = experts
        .values()
        .any(|e| e.discarded.iter().any(Option::is_some));
    for (e, found) in &experts {
        if !any_discarded {
            break;
        }
        for (slot, tensor) in found.discarded.iter().enumerate() {
            let inputs = if slot < 2 { h } else { i };
            match tensor {
                Some((name, t)) if t.dtype == Dtype::I32 && t.shape == [inputs] => {
                    discarded.push(name.to_string())
                }
                Some((name, t)) => {
                    return Err(err(format!(
                        "`{name}` is {} {:?}; a group index holds one I32 per input, [{inputs}]",
                        t.dtype, t.shape
                    )))
                }
                None => {
                    return Err(err(format!(
                        "`{prefix}.{e}.{}` has no group index beside it (other matrices have one)",
                        modules[slot]
                    )))
                }
            }
        }
    }
    let mut companions = PerExpertFound::new();
    for (e, found) in experts.into_values().enumerate() {
        for (kind, slots) in found.companions {
            let kind_experts = companions.entry(kind).or_default();
            kind_experts.resize(e, [None; 3]); // experts before `e` lack this kind
            kind_experts.push(slots);
        }
    }
    for kind_experts in companions.values_mut() {
        kind_experts.resize(num_experts, [None; 3]);
    }
    if let Some(bare) = companions.remove(BARE_SCALE) {
        let kind = bare_scale_kind(pack);
        if companions.contains_key(kind) {
            return Err(err(format!(
                "the experts have both `{BARE_SCALE}` and `{kind}` scales beside their \
                 weights (`{prefix}.0.{}.{BARE_SCALE}`): one weight scale per weight",
                modules[0]
            )));
        }
        companions.insert(kind, bare);
    }
    let weights = Weights {
        prefix: &prefix,
        hidden: h,
        inter: i,
        dtype,
        pack,
        out_pack,
        k_first: k_first.is_some(),
        packing: mx_pack
            .and_then(Packing::find_mx)
            .unwrap_or_else(|| Packing::find(false, pack.max(out_pack))),
    };
    let quantization = quant::per_expert(ckpt, &weights, modules, companions)?;
    Ok(MoeLayer {
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype,
        pack,
        quantization,
        tensors: ExpertTensors::PerExpert(PerExpertTensors {
            naming,
            weights: [g, u, d],
            biases: has_bias.then_some([gb, ub, db]),
            k_first: k_first.is_some(),
            out_pack,
            discarded,
        }),
        prefix,
    })
}
