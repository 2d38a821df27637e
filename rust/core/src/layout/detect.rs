//! Finding every routed-expert group of a checkpoint.

use super::check::layout_error;
use super::fused::fused_group;
use super::layer::MoeLayer;
use super::naming::{GATE_UP_METADATA_KEY, INTERLEAVED_MODEL_TYPES};
use super::per_expert::{per_expert_candidates, per_expert_group};
use super::stacked::stacked_group;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Every routed-expert group of the checkpoint, in natural prefix order (layer 2 before 10).
/// `interleaved` overrides the gate/up interleaving of fused tensors, which is otherwise
/// what the shards record ([`GATE_UP_METADATA_KEY`]), else taken from `model_type`, else
/// from the names (mxfp4 `_blocks` exist only in gpt-oss, which interleaves them); an
/// override that contradicts the record is an error.
pub fn detect(ckpt: &Checkpoint, interleaved: Option<bool>) -> Result<Vec<MoeLayer>> {
    let interleaved = gate_up_interleaved(ckpt, interleaved)?;
    let mut layers = Vec::new();
    for (name, gate_up) in ckpt.entries() {
        if let Some(layer) = fused_group(ckpt, name, gate_up, interleaved)? {
            layers.push(layer);
        }
        if let Some(layer) = stacked_group(ckpt, name, gate_up)? {
            layers.push(layer);
        }
    }
    for (prefix, naming, experts) in per_expert_candidates(ckpt) {
        if layers.iter().any(|l| l.prefix == prefix) {
            return Err(layout_error(
                ckpt,
                &prefix,
                "holds both fused and per-expert tensors".into(),
            ));
        }
        layers.push(per_expert_group(ckpt, prefix, naming, experts)?);
    }
    layers.sort_by(|a, b| natural_cmp(&a.prefix, &b.prefix));
    Ok(layers)
}

/// Whether fused gate/up tensors interleave gate and up, where the caller or the files say
/// so or `model_type` implies it; `None` where nothing does (the names decide then).
fn gate_up_interleaved(ckpt: &Checkpoint, requested: Option<bool>) -> Result<Option<bool>> {
    let recorded = match ckpt.recorded(GATE_UP_METADATA_KEY) {
        None => None,
        Some(("concatenated", file)) => Some((false, file)),
        Some(("interleaved", file)) => Some((true, file)),
        Some((other, file)) => {
            return Err(Error::Checkpoint {
                path: file.to_path_buf(),
                reason: format!(
                    "`{GATE_UP_METADATA_KEY}` records gate/up as `{other}`; expected \
                     `concatenated` or `interleaved`"
                ),
            })
        }
    };
    match (requested, recorded) {
        (Some(wanted), Some((found, file))) if wanted != found => Err(Error::Checkpoint {
            path: file.to_path_buf(),
            reason: format!(
                "interleaved={} contradicts the file, which records its fused gate/up \
                 tensors as {}: leave `interleaved` unset",
                if wanted { "True" } else { "False" },
                if found { "interleaved" } else { "concatenated" }
            ),
        }),
        (Some(wanted), _) => Ok(Some(wanted)),
        (None, Some((found, _))) => Ok(Some(found)),
        (None, None) => Ok(ckpt
            .model_type()
            .is_some_and(|t| INTERLEAVED_MODEL_TYPES.contains(&t))
            .then_some(true)),
    }
}

/// Orders `layers.2` before `layers.10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(String, u64)> {
        s.split('.')
            .map(|part| match part.parse::<u64>() {
                Ok(n) => (String::new(), n),
                Err(_) => (part.to_string(), 0),
            })
            .collect()
    };
    key(a).cmp(&key(b))
}
