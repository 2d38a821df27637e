//! Stacked groups: each matrix of all experts in one 2-D tensor (DBRX).

use super::check::{entry, layout_error, same_dtype};
use super::layer::{ExpertTensors, MoeLayer, StackedTensors};
use super::naming::{NUM_EXPERTS_KEYS, STACKED_NAMES};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::quant::{self, Packing, Weights};
use crate::shard::TensorEntry;

/// The number of routed experts `config.json` declares, if it does.
fn config_num_experts(ckpt: &Checkpoint) -> Option<usize> {
    let config = ckpt.config()?;
    let scopes = [Some(config), config.get("text_config")];
    scopes.into_iter().flatten().find_map(|scope| {
        NUM_EXPERTS_KEYS.iter().find_map(|key| {
            key.split('.')
                .try_fold(scope, |v, k| v.get(k))?
                .as_u64()
                .map(|n| n as usize)
        })
    })
}

/// The stacked group whose gate tensor is `name`, if `name` is one (DBRX).
pub(super) fn stacked_group(
    ckpt: &Checkpoint,
    name: &str,
    gate: &TensorEntry,
) -> Result<Option<MoeLayer>> {
    let Some((prefix, [_, up_suffix, down_suffix])) = STACKED_NAMES.iter().find_map(|names| {
        let prefix = name.strip_suffix(names[0])?.strip_suffix('.')?;
        Some((prefix, *names))
    }) else {
        return Ok(None);
    };
    let err = |reason: String| layout_error(ckpt, prefix, reason);
    let (up_name, down_name) = (
        format!("{prefix}.{up_suffix}"),
        format!("{prefix}.{down_suffix}"),
    );
    let (Some(up), Some(down)) = (entry(ckpt, &up_name), entry(ckpt, &down_name)) else {
        return Err(err(format!(
            "`{name}` needs `{up_name}` and `{down_name}` beside it (experts stacked as [E·I, H])"
        )));
    };
    if gate.shape.len() != 2 || up.shape != gate.shape || down.shape != gate.shape {
        return Err(err(format!(
            "`{name}` {:?}, `{up_name}` {:?} and `{down_name}` {:?} should all be [E·I, H]",
            gate.shape, up.shape, down.shape
        )));
    }
    let num_experts = config_num_experts(ckpt).ok_or_else(|| {
        err(format!(
            "`{name}` {:?} stacks all experts' rows; config.json must say how many experts              there are (one of {})",
            gate.shape,
            NUM_EXPERTS_KEYS.join(", ")
        ))
    })?;
    let (rows, h) = (gate.shape[0], gate.shape[1]);
    if num_experts == 0 || rows == 0 || h == 0 || !rows.is_multiple_of(num_experts) {
        return Err(err(format!(
            "`{name}` {:?} does not hold {num_experts} experts (config.json) of equal size",
            gate.shape
        )));
    }
    let dtype = same_dtype(
        ckpt,
        prefix,
        &[(name, gate), (&up_name, up), (&down_name, down)],
    )?;
    let i = rows / num_experts;
    let weights = Weights {
        prefix,
        hidden: h,
        inter: i,
        dtype,
        pack: 1,
        packing: Packing::find(false, 1),
        out_pack: 1,
        k_first: false,
    };
    // No companions are known for this layout: fp8 weights fail here for want of scales.
    let quantization = quant::per_expert(ckpt, &weights, ["w1", "v1", "w2"], Default::default())?;
    Ok(Some(MoeLayer {
        prefix: prefix.to_string(),
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype: None,
        pack: 1,
        quantization,
        tensors: ExpertTensors::Stacked(StackedTensors {
            gate: name.to_string(),
            up: up_name,
            down: down_name,
        }),
    }))
}
