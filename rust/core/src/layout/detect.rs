//! Finding every routed-expert group of a checkpoint.

use super::check::layout_error;
use super::fused::fused_group;
use super::layer::MoeLayer;
use super::naming::{GATE_UP_METADATA_KEY, INTERLEAVED_MODEL_TYPES};
use super::per_expert::{per_expert_candidates, per_expert_group};
use super::stacked::stacked_group;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// A group of expert tensors that has the shape of a layout but cannot be loaded, and why:
/// the reason of the `Error::Layout` about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedGroup {
    pub prefix: String,
    pub reason: String,
}

/// What detection finds: the groups that load, and those that cannot (each with why), so
/// that one bad group never hides the others or the rest of the checkpoint.
#[derive(Debug, Default)]
pub struct Detected {
    pub layers: Vec<MoeLayer>,
    pub failed: Vec<FailedGroup>,
}

impl Detected {
    /// The `Error::Layout` that says why the group at `prefix` cannot be loaded, if it is one
    /// of the failed groups.
    pub fn error(&self, ckpt: &Checkpoint, prefix: &str) -> Option<Error> {
        let failed = self.failed.iter().find(|f| f.prefix == prefix)?;
        Some(layout_error(ckpt, prefix, failed.reason.clone()))
    }

    /// A failure of one group is recorded; any other error is the checkpoint's.
    fn group<T>(&mut self, found: Result<Option<T>>) -> Result<Option<T>> {
        match found {
            Err(Error::Layout { prefix, reason, .. }) => {
                self.fail(prefix, reason);
                Ok(None)
            }
            other => other,
        }
    }

    fn fail(&mut self, prefix: String, reason: String) {
        self.layers.retain(|l| l.prefix != prefix);
        if !self.failed.iter().any(|f| f.prefix == prefix) {
            self.failed.push(FailedGroup { prefix, reason });
        }
    }
}

/// Every routed-expert group of the checkpoint, in natural prefix order (layer 2 before 10),
/// or the first reason one of them cannot be loaded (see [`detect_groups`] for all of
/// them).
pub fn detect(ckpt: &Checkpoint, interleaved: Option<bool>) -> Result<Vec<MoeLayer>> {
    let found = detect_groups(ckpt, interleaved)?;
    match found.failed.first() {
        Some(failed) => Err(layout_error(ckpt, &failed.prefix, failed.reason.clone())),
        None => Ok(found.layers),
    }
}

/// Every routed-expert group of the checkpoint that loads, and every one that cannot with
/// its reason, each in natural prefix order (layer 2 before 10). `interleaved` overrides the
/// gate/up interleaving of fused tensors, which is otherwise what the shards record
/// ([`GATE_UP_METADATA_KEY`]), else taken from `model_type`, else from the names (mxfp4
/// `_blocks` exist only in gpt-oss, which interleaves them); an override that contradicts
/// the record is an error of the whole checkpoint. A file of a sharded checkpoint opened
/// alone holds part of some groups: those fail, naming the files that hold the rest.
pub fn detect_groups(ckpt: &Checkpoint, interleaved: Option<bool>) -> Result<Detected> {
    let interleaved = gate_up_interleaved(ckpt, interleaved)?;
    let mut found = Detected::default();
    for (name, gate_up) in ckpt.entries() {
        let fused = fused_group(ckpt, name, gate_up, interleaved);
        if let Some(layer) = found.group(fused)? {
            found.layers.push(layer);
        }
        let stacked = stacked_group(ckpt, name, gate_up);
        if let Some(layer) = found.group(stacked)? {
            found.layers.push(layer);
        }
    }
    for (prefix, naming, experts) in per_expert_candidates(ckpt) {
        if found.layers.iter().any(|l| l.prefix == prefix) {
            found.fail(prefix, "holds both fused and per-expert tensors".into());
            continue;
        }
        let group = per_expert_group(ckpt, prefix, naming, experts).map(Some);
        if let Some(layer) = found.group(group)? {
            found.layers.push(layer);
        }
    }
    // Part of a group read as the whole would be wrong however it failed or loaded.
    let prefixes = found.layers.iter().map(|l| &l.prefix);
    let partial: Vec<(String, String)> = prefixes
        .chain(found.failed.iter().map(|f| &f.prefix))
        .filter_map(|prefix| {
            let files = ckpt.shards_elsewhere(prefix);
            (!files.is_empty()).then(|| (prefix.clone(), partial_reason(ckpt, &files)))
        })
        .collect();
    for (prefix, reason) in partial {
        found.failed.retain(|f| f.prefix != prefix);
        found.fail(prefix, reason);
    }
    found
        .layers
        .sort_by(|a, b| natural_cmp(&a.prefix, &b.prefix));
    found
        .failed
        .sort_by(|a, b| natural_cmp(&a.prefix, &b.prefix));
    Ok(found)
}

fn partial_reason(ckpt: &Checkpoint, files: &std::collections::BTreeSet<&str>) -> String {
    let dir = ckpt.path().parent().unwrap_or(std::path::Path::new("."));
    let names: Vec<&str> = files.iter().copied().take(3).collect();
    let more = if files.len() > 3 { ", ..." } else { "" };
    format!(
        "continues in other files of its checkpoint ({}{more}), as the index beside this \
         file says: open the directory {}, not one of its files",
        names.join(", "),
        dir.display()
    )
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
