//! What `quantization_config` in `config.json` (also under `text_config`) declares, read
//! through the [`METHODS`] table.

use serde_json::Value;

use super::scheme::{
    expert_dtype_declares, Declared, EXPERT_DTYPE_KEY, EXPERT_DTYPE_MODEL_TYPES, METHODS,
    MX_METHODS,
};

/// What `quantization_config` in `config.json` (also under `text_config`) declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantConfig {
    /// `quant_method`: `fp8`, `compressed-tensors`, `fbgemm_fp8`, `modelopt`, ...
    pub method: String,
    /// `weight_block_size` (fp8) or `block_structure` (compressed-tensors), when block-scaled.
    pub block: Option<(usize, usize)>,
    /// The weight scale's strategy the config states (`block`, `group`, `channel`,
    /// `tensor`), if any.
    pub scheme: Option<&'static str>,
    /// `num_bits` of compressed-tensors' integer (`pack-quantized`) weights.
    pub int_bits: Option<usize>,
    /// `symmetric` of those integer weights: asymmetric ones carry `weight_zero_point`.
    pub symmetric: Option<bool>,
}

impl QuantConfig {
    /// The scheme `config.json` declares when fastmoe_load does not load it (`mxfp4`,
    /// `modelopt NVFP4`, `compressed-tensors int4 pack-quantized`, ...), by name; `None` for
    /// the schemes it loads.
    pub fn unsupported(config: Option<&Value>) -> Option<String> {
        declared(config)?.1.unsupported
    }

    pub fn from_config(config: Option<&Value>) -> Option<QuantConfig> {
        let (method, declared) = declared(config)?;
        Some(QuantConfig {
            method: method.to_string(),
            block: declared.block,
            scheme: declared.scheme,
            int_bits: declared.int_bits,
            symmetric: declared.symmetric,
        })
    }
}

/// `quant_method` and what the rest of `quantization_config` declares; an unknown method
/// declares nothing but itself, which is not loaded.
fn declared(config: Option<&Value>) -> Option<(&str, Declared)> {
    let config = config?;
    let q = quantization_config(config)?;
    let method = q.get("quant_method")?.as_str()?;
    let mut declared = match METHODS.iter().chain(&MX_METHODS).find(|m| m.name == method) {
        Some(m) => (m.read)(q),
        None => Declared {
            unsupported: Some(method.to_string()),
            ..Declared::default()
        },
    };
    let text = config.get("text_config");
    let expert_dtype = [Some(config), text, Some(q)]
        .into_iter()
        .flatten()
        .find_map(|c| c.get(EXPERT_DTYPE_KEY)?.as_str())
        .or_else(|| {
            // vLLM takes DeepSeek-V4 experts without an `expert_dtype` as fp4.
            let model_type = [Some(config), text]
                .into_iter()
                .flatten()
                .find_map(|c| c.get("model_type")?.as_str());
            model_type
                .is_some_and(|t| EXPERT_DTYPE_MODEL_TYPES.contains(&t))
                .then_some("fp4")
        });
    if let (Some(experts), None) = (expert_dtype, &declared.unsupported) {
        let algo = q.get("moe_quant_algo").and_then(Value::as_str);
        expert_dtype_declares(method, experts, algo, &mut declared);
    }
    Some((method, declared))
}

/// `quantization_config` of `config.json`, also where it sits under `text_config`.
fn quantization_config(config: &Value) -> Option<&Value> {
    config
        .get("quantization_config")
        .or_else(|| config.get("text_config")?.get("quantization_config"))
}
