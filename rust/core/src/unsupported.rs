//! Groups of tensors that look like routed experts but that [`detect`](crate::detect) cannot
//! load: named with the reason, so that a checkpoint of an unknown scheme never reads as one
//! without experts.
//!
//! A tensor looks like part of a routed expert when a component of its name says `expert`
//! (not `shared`) and is followed by an expert index (`experts.7.…`) or holds a matrix of
//! all experts (`experts.gate_up_proj_blocks [E, …]`), or when a `moe` component holds a
//! tensor with a leading expert dimension (`block_sparse_moe.…[E, 2I, H]`).

use std::collections::{BTreeMap, HashSet};

use crate::checkpoint::Checkpoint;
use crate::layout::{naming, Detected, MoeLayer};
use crate::quant::{self, QuantConfig, FOREIGN_QUANT_SUFFIXES};
use crate::shard::TensorEntry;

/// A group of expert-like tensors under `prefix` that no loadable layout covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedGroup {
    pub prefix: String,
    /// In file order.
    pub tensors: Vec<String>,
    /// Why it cannot be loaded: `unknown quantization: …`, `unread tensors: …` (beside a
    /// group that loads) or `unknown naming: …`.
    pub reason: String,
}

/// The experts prefix `name` would belong to, if it looks like part of a routed expert.
fn expert_prefix(name: &str, entry: &TensorEntry) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let is_index = |i: usize| parts.get(i).is_some_and(|p| p.parse::<usize>().is_ok());
    let routed = |p: &str, word: &str| p.contains(word) && !p.contains("shared");
    let at = parts
        .iter()
        .enumerate()
        .rev()
        .find(|&(i, p)| routed(p, "expert") && (is_index(i + 1) || entry.shape.len() >= 2))
        .or_else(|| {
            let last = parts.len().saturating_sub(1);
            parts
                .iter()
                .enumerate()
                .take(last)
                .rev()
                .find(|(_, p)| routed(p, "moe") && entry.shape.len() >= 3)
        })
        .map(|(i, _)| i)?;
    (at + 1 < parts.len()).then(|| parts[..=at].join("."))
}

/// Every group of expert-like tensors that detection leaves unread, by prefix in natural
/// order, each with the reason it cannot be loaded: the groups that failed detection (every
/// tensor under their prefix, with the failure's reason), then the rest.
pub fn unsupported_groups(ckpt: &Checkpoint, detected: &Detected) -> Vec<UnsupportedGroup> {
    let layers = &detected.layers;
    let claimed: HashSet<&str> = layers.iter().flat_map(|l| l.tensor_names()).collect();
    let mut failed: Vec<UnsupportedGroup> = detected
        .failed
        .iter()
        .map(|f| UnsupportedGroup {
            prefix: f.prefix.clone(),
            tensors: Vec::new(),
            reason: f.reason.clone(),
        })
        .collect();
    let mut groups: BTreeMap<String, Vec<(&str, &TensorEntry)>> = BTreeMap::new();
    for (name, entry) in ckpt.entries() {
        if claimed.contains(name) {
            continue;
        }
        let under = |g: &&mut UnsupportedGroup| {
            name.strip_prefix(g.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        };
        if let Some(group) = failed.iter_mut().find(under) {
            group.tensors.push(name.to_string());
        } else if let Some(prefix) = expert_prefix(name, entry) {
            groups.entry(prefix).or_default().push((name, entry));
        }
    }
    let config_scheme = QuantConfig::unsupported(ckpt.config());
    let mut found: Vec<UnsupportedGroup> = groups
        .into_iter()
        .map(|(prefix, tensors)| {
            let reason = reason(&prefix, &tensors, config_scheme.as_deref(), layers);
            UnsupportedGroup {
                tensors: tensors.iter().map(|(n, _)| n.to_string()).collect(),
                prefix,
                reason,
            }
        })
        .collect();
    found.extend(failed);
    found.sort_by(|a, b| crate::layout::natural_cmp(&a.prefix, &b.prefix));
    found
}

fn reason(
    prefix: &str,
    tensors: &[(&str, &TensorEntry)],
    config_scheme: Option<&str>,
    layers: &[MoeLayer],
) -> String {
    let foreign = tensors.iter().find(|(name, entry)| {
        let last = name.rsplit('.').next().unwrap_or(name);
        FOREIGN_QUANT_SUFFIXES
            .iter()
            .any(|s| last == *s || (s.starts_with('_') && last.ends_with(s)))
            || (!quant::is_float(entry.dtype) && entry.shape.len() >= 2)
    });
    let describe = |(name, entry): &(&str, &TensorEntry)| {
        format!("`{name}` ({} {:?})", entry.dtype, entry.shape)
    };
    if let Some(scheme) = config_scheme {
        let example = foreign
            .or(tensors.first())
            .map(describe)
            .unwrap_or_default();
        return format!(
            "unknown quantization: config.json declares {scheme}, which fastmoe_load does not \
             load ({example})"
        );
    }
    if let Some(tensor) = foreign {
        return format!(
            "unknown quantization: {} belongs to no quantization scheme fastmoe_load loads",
            describe(tensor)
        );
    }
    if layers.iter().any(|l| l.prefix == prefix) {
        return format!(
            "unread tensors: {} lies beside the loaded group but no destination reads it",
            describe(&tensors[0])
        );
    }
    format!(
        "unknown naming: {} fits no routed-expert layout ({})",
        describe(&tensors[0]),
        naming::described()
    )
}
