//! What detection found for a quantized group: its method and its companion tensors.

use safetensors::tensor::Dtype;

use super::grid::Grid;
use super::scheme::CompanionKind;

/// The companions of one expert group: `quant_method` and one [`Companion`] per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantization {
    /// `quant_method` from `config.json`, or `fp8` where only the files say so.
    pub method: String,
    pub companions: Vec<Companion>,
}

impl Quantization {
    pub fn companion(&self, kind: &str) -> Option<&Companion> {
        self.companions.iter().find(|c| c.kind.name == kind)
    }

    /// The weight's own scale (`weight_scale_inv` or `weight_scale`).
    pub fn weight_scale(&self) -> &Companion {
        self.companions
            .iter()
            .find(|c| c.kind.weight_scale)
            .expect("a quantized group has a weight scale (checked at detection)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companion {
    pub kind: &'static CompanionKind,
    /// vLLM keeps one value per expert for gate and up (the kind's rule, except where the
    /// method keeps both: NVFP4's `w13_input_scale [E, 2]`).
    pub merged_w13: bool,
    pub grid: Grid,
    pub dtype: Dtype,
    pub tensors: CompanionTensors,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompanionTensors {
    /// `[gate, up, down][expert]`, each the companion of one expert's matrix.
    PerExpert([Vec<String>; 3]),
    /// `gate_up [E, 2·r, c]` (gate's `r` rows, then up's) and `down [E, r, c]`; `[E]` each for a
    /// kind merged over gate and up.
    Fused { gate_up: String, down: String },
}

impl Companion {
    pub fn tensor_names(&self) -> Vec<&str> {
        match &self.tensors {
            CompanionTensors::PerExpert(t) => t.iter().flatten().map(String::as_str).collect(),
            CompanionTensors::Fused { gate_up, down } => vec![gate_up, down],
        }
    }
}
