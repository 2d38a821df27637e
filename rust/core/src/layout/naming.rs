//! The names routed-expert tensors go by, one table per layout: a new naming scheme is a
//! new row here. Detection (the `fused`, `stacked` and `per_expert` finders) reads only
//! these tables.

/// A per-expert naming scheme: the module names of gate, up and down.
#[derive(Debug, PartialEq, Eq)]
pub struct Naming {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

pub const NAMINGS: [Naming; 3] = [
    Naming {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    },
    Naming {
        gate: "w1",
        up: "w3",
        down: "w2",
    },
    Naming {
        gate: "linear",
        up: "linear_v",
        down: "linear_1",
    },
];

/// What the module holding per-expert modules is called, in part: `experts` (Qwen, DeepSeek,
/// Mixtral's `block_sparse_moe.experts`, DeepSeek-V4's `ffn.experts`). Numbered modules under
/// any other name are not routed experts, whatever they hold: LongCat-Flash's two dense MLPs
/// per layer, `mlps.0` and `mlps.1`, are ordinary weights.
pub const EXPERTS_CONTAINER: &str = "expert";

/// Whether `prefix` (the module before an expert index) holds routed experts.
pub(super) fn is_experts_container(prefix: &str) -> bool {
    let last = prefix.rsplit('.').next().unwrap_or(prefix);
    last.contains(EXPERTS_CONTAINER) && !last.contains("shared")
}

/// The last component of a per-expert weight's name: `{module}.weight`, or
/// `{module}.weight_packed` for compressed-tensors' packed integers.
pub const WEIGHT: &str = "weight";
pub const PACKED_WEIGHT: &str = "weight_packed";
/// GPTQ's and AWQ's packed integer weights, stored input-first (see
/// [`K_FIRST_PACKINGS`](crate::quant::K_FIRST_PACKINGS)).
pub const QWEIGHT: &str = "qweight";
pub const BIAS: &str = "bias";

/// Whether `name` is a packed integer weight, whose values pack as `config.json`'s
/// `num_bits` says.
pub(super) fn is_packed_weight(name: &str) -> bool {
    name.strip_suffix(PACKED_WEIGHT)
        .is_some_and(|rest| rest.ends_with('.'))
}

/// Whether `name` is GPTQ's or AWQ's packed integer weight (`….qweight`).
pub(super) fn is_qweight(name: &str) -> bool {
    name.strip_suffix(QWEIGHT)
        .is_some_and(|rest| rest.ends_with('.'))
}

/// Names of a fused gate/up tensor, its down companion, and their biases where the family
/// has them, as suffixes of the experts prefix.
pub(super) struct FusedNames {
    pub gate_up: &'static str,
    pub down: &'static str,
    pub biases: Option<(&'static str, &'static str)>,
    /// For mxfp4 weights (gpt-oss): the names of their e8m0 scales. Such weights are stored
    /// as `[E, rows, cols/32, 16]` uint8, blocks of 32 e2m1 values two a byte, and their scales
    /// as `[E, rows, cols/32]` uint8, one per block.
    pub mx_scales: Option<(&'static str, &'static str)>,
}

pub(super) const FUSED_NAMES: [FusedNames; 3] = [
    FusedNames {
        gate_up: "gate_up_proj",
        down: "down_proj",
        biases: Some(("gate_up_proj_bias", "down_proj_bias")),
        mx_scales: None,
    },
    FusedNames {
        gate_up: "gate_up_proj_blocks",
        down: "down_proj_blocks",
        biases: Some(("gate_up_proj_bias", "down_proj_bias")),
        mx_scales: Some(("gate_up_proj_scales", "down_proj_scales")),
    },
    FusedNames {
        gate_up: "input_linear.weight",
        down: "output_linear.weight",
        biases: None,
        mx_scales: None,
    },
];

/// Suffixes of the experts prefix naming stacked gate, up and down tensors.
pub(super) const STACKED_NAMES: [[&str; 3]; 1] = [["mlp.w1", "mlp.v1", "mlp.w2"]];

/// `config.json` keys (dotted paths) that give the number of routed experts, which the
/// shape of a stacked tensor `[E·I, H]` does not tell.
pub(super) const NUM_EXPERTS_KEYS: [&str; 4] = [
    "ffn_config.moe_num_experts",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
];

/// `model_type`s whose fused gate/up tensor interleaves gate and up.
pub(super) const INTERLEAVED_MODEL_TYPES: [&str; 1] = ["gpt_oss"];

/// The shard metadata entry in which a writer records how gate and up are arranged in its
/// fused tensors (`concatenated` or `interleaved`): what the files say beats what
/// `config.json`'s `model_type` implies (a gpt-oss checkpoint rewritten with gate and up
/// concatenated is still `gpt_oss`).
pub const GATE_UP_METADATA_KEY: &str = "fastmoe_load.gate_up";

/// The namings detection knows, as error messages list them: `per expert a/b/c, … or x/y/z;
/// fused …`.
pub fn described() -> String {
    fn list(items: &[String]) -> String {
        match items.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }
    let per_expert: Vec<String> = NAMINGS
        .iter()
        .map(|n| format!("{}/{}/{}", n.gate, n.up, n.down))
        .collect();
    // mxfp4's `_blocks` are a packing of the first fused naming, not a naming of their own.
    let module = |name: &'static str| name.strip_suffix(".weight").unwrap_or(name);
    let fused: Vec<String> = FUSED_NAMES
        .iter()
        .filter(|f| f.mx_scales.is_none())
        .map(|f| format!("{}/{}", module(f.gate_up), module(f.down)))
        .collect();
    format!("per expert {}; fused {}", list(&per_expert), list(&fused))
}

#[cfg(test)]
mod tests {
    #[test]
    fn described_lists_every_naming() {
        assert_eq!(
            super::described(),
            "per expert gate_proj/up_proj/down_proj, w1/w3/w2 or linear/linear_v/linear_1; \
             fused gate_up_proj/down_proj or input_linear/output_linear"
        );
    }
}
