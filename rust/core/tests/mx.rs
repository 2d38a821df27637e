//! Per-expert OCP MX experts (one e8m0 scale per 32 values of a row), as the 2026 releases
//! store them: DeepSeek-V4 (`layers.N.ffn.experts.E.w1.weight` int8-typed bytes of two e2m1
//! values, `w1.scale` float8_e8m0fnu, `expert_dtype: fp4` beside an fp8 `quantization_config`),
//! Kimi-K3 (compressed-tensors `mxfp4-pack-quantized`: `weight_packed` uint8, `weight_scale`
//! uint8), AMD Quark OCP MX (`weight` uint8, `weight_scale` uint8) and MXFP8 (float8 e4m3
//! `weight` and e8m0 `weight_scale`, ModelOpt and MiniMax).

mod common;

use common::{execute, layer, open, tensor, Tensor};
use fastmoe_load_core::{
    detect, detect_groups, unsupported_groups, CopyPlan, Dtype, Grid, LoadRequest, MoeLayer, Target,
};

const E: usize = 3;
const H: usize = 128;
const I: usize = 64;

const V4_PREFIX: &str = "layers.0.ffn.experts";
const V4_CONFIG: &str = r#"{"model_type": "deepseek_v4", "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}"#;

/// A distinct byte for entry `(r, c)` of matrix `m` (0 gate, 1 up, 2 down) of expert `e`;
/// `scale` tells scales from weights.
fn byte(scale: bool, e: usize, m: usize, r: usize, c: usize) -> u8 {
    (usize::from(scale) * 89 + e * 71 + m * 37 + r * 7 + c * 13) as u8
}

fn matrix(
    name: String,
    dtype: Dtype,
    scale: bool,
    e: usize,
    m: usize,
    shape: [usize; 2],
) -> Tensor {
    let size = if dtype == Dtype::BF16 { 2 } else { 1 };
    let data = (0..shape[0])
        .flat_map(|r| (0..shape[1] * size).map(move |c| byte(scale, e, m, r, c)))
        .collect();
    tensor(name, dtype, &shape, data)
}

/// Per-expert MX experts under `prefix`: modules `[gate, up, down]`, the weight's last name
/// component and dtype, the scale's and its dtype; `pack` values a stored weight element.
#[allow(clippy::too_many_arguments)]
fn mx_experts(
    prefix: &str,
    modules: [&str; 3],
    (weight, weight_dtype): (&str, Dtype),
    (scale, scale_dtype): (&str, Dtype),
    pack: usize,
) -> Vec<Tensor> {
    let mut tensors = vec![];
    for e in 0..E {
        for (m, module) in modules.iter().enumerate() {
            let (rows, cols) = if m < 2 { (I, H) } else { (H, I) };
            let name = |last: &str| format!("{prefix}.{e}.{module}.{last}");
            tensors.push(matrix(
                name(weight),
                weight_dtype,
                false,
                e,
                m,
                [rows, cols / pack],
            ));
            tensors.push(matrix(
                name(scale),
                scale_dtype,
                true,
                e,
                m,
                [rows, cols / 32],
            ));
        }
    }
    tensors
}

/// DeepSeek-V4-Flash's experts and the dense tensors beside them: fp8 shared experts with
/// 128 × 128 e8m0 `scale`s, the router.
fn deepseek_v4() -> Vec<Tensor> {
    let mut tensors = mx_experts(
        V4_PREFIX,
        ["w1", "w3", "w2"],
        ("weight", Dtype::I8),
        ("scale", Dtype::F8_E8M0),
        2,
    );
    for (m, module) in ["w1", "w3", "w2"].iter().enumerate() {
        let (rows, cols) = if m < 2 { (I, H) } else { (H, I) };
        let name = |last: &str| format!("layers.0.ffn.shared_experts.{module}.{last}");
        tensors.push(matrix(
            name("weight"),
            Dtype::F8_E4M3,
            false,
            9,
            m,
            [rows, cols],
        ));
        let blocks = [rows.div_ceil(128), cols.div_ceil(128)];
        tensors.push(matrix(name("scale"), Dtype::F8_E8M0, true, 9, m, blocks));
    }
    tensors.push(matrix(
        "layers.0.ffn.gate.weight".into(),
        Dtype::BF16,
        false,
        9,
        0,
        [E, H],
    ));
    tensors
}

fn assert_mx(layer: &MoeLayer, prefix: &str, dtype: Dtype, pack: usize, scale_dtype: Dtype) {
    assert_eq!(layer.prefix, prefix);
    assert_eq!(layer.format(), "per_expert");
    assert_eq!(
        (
            layer.num_experts,
            layer.hidden_size,
            layer.intermediate_size
        ),
        (E, H, I)
    );
    assert_eq!((layer.dtype, layer.pack), (dtype, pack));
    let q = layer.quantization.as_ref().expect("quantized");
    assert_eq!(q.companions.len(), 1, "{q:?}");
    let scale = q.weight_scale();
    assert_eq!(scale.kind.name, "weight_scale");
    assert_eq!(scale.grid, Grid::Block { rows: 1, cols: 32 });
    assert_eq!(scale.dtype, scale_dtype);
}

#[test]
fn deepseek_v4_fp4_experts_load_wherever_expert_dtype_is() {
    let v41 = r#"{"model_type": "deepseek_v41", "quantization_config": {"quant_method": "fp8",
        "expert_dtype": "fp4", "weight_block_size": [32, 32]}}"#;
    let text = r#"{"model_type": "x", "text_config": {"expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}}"#;
    // vLLM takes a DeepSeek-V4 config without `expert_dtype` as fp4.
    let implied = r#"{"model_type": "deepseek_v4", "quantization_config":
        {"quant_method": "fp8", "weight_block_size": [128, 128]}}"#;
    for config in [V4_CONFIG, v41, text, implied] {
        let (_dir, ckpt) = open(&deepseek_v4(), Some(config));
        let layer = layer(&ckpt);
        assert_mx(&layer, V4_PREFIX, Dtype::I8, 2, Dtype::F8_E8M0);
        assert_eq!(layer.quantization.as_ref().unwrap().method, "fp8");
        // The shared experts are dense weights, and every expert tensor is the group's.
        let found = detect_groups(&ckpt, None).unwrap();
        assert!(
            found.failed.is_empty() && found.layers == [layer],
            "{config}"
        );
        assert!(unsupported_groups(&ckpt, &found).is_empty(), "{config}");
    }
}

#[test]
fn deepseek_v4_fp8_experts_take_their_scales_as_block_scales() {
    // Flash-Base: fp8 experts, float32 `scale` 128 × 128 blocks, which vLLM's DeepSeek-V4
    // loader maps to `weight_scale_inv` (its `Fp8MoEMethod`).
    let mut tensors = vec![];
    for e in 0..E {
        for (m, module) in ["w1", "w3", "w2"].iter().enumerate() {
            let (rows, cols) = if m < 2 { (I, H) } else { (H, I) };
            let name = |last: &str| format!("{V4_PREFIX}.{e}.{module}.{last}");
            tensors.push(matrix(
                name("weight"),
                Dtype::F8_E4M3,
                false,
                e,
                m,
                [rows, cols],
            ));
            let data = vec![0u8; 4 * rows.div_ceil(128) * cols.div_ceil(128)];
            let blocks = [rows.div_ceil(128), cols.div_ceil(128)];
            tensors.push(tensor(name("scale"), Dtype::F32, &blocks, data));
        }
    }
    let config = V4_CONFIG.replace(r#""expert_dtype": "fp4""#, r#""expert_dtype": "fp8""#);
    let (_dir, ckpt) = open(&tensors, Some(&config));
    let layer = layer(&ckpt);
    let scale = layer.quantization.as_ref().unwrap().weight_scale();
    assert_eq!(scale.kind.name, "weight_scale_inv");
    assert_eq!(
        scale.grid,
        Grid::Block {
            rows: 128,
            cols: 128
        }
    );
}

#[test]
fn an_unknown_expert_dtype_is_declared_not_loaded() {
    let config = V4_CONFIG.replace(r#""expert_dtype": "fp4""#, r#""expert_dtype": "int2""#);
    let (_dir, ckpt) = open(&deepseek_v4(), Some(&config));
    assert!(detect(&ckpt, None).unwrap().is_empty());
    let groups = unsupported_groups(&ckpt, &detect_groups(&ckpt, None).unwrap());
    let reasons: Vec<&str> = groups.iter().map(|g| g.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("fp8 with expert_dtype int2")),
        "{reasons:?}"
    );
}

#[test]
fn kimi_k3_quark_and_mxfp8_releases_are_mx_groups() {
    let kimi = r#"{"model_type": "kimi_k3", "quantization_config": {"quant_method":
        "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {"group_0":
        {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "group",
        "group_size": 32, "symmetric": true}}}}}"#;
    let quark = r#"{"quantization_config": {"quant_method": "quark", "global_quant_config":
        {"weight": {"dtype": "fp4", "qscheme": "per_group", "group_size": 32,
        "scale_format": "e8m0", "ch_axis": -1, "is_dynamic": false}}}}"#;
    let modelopt = r#"{"quantization_config": {"quant_method": "modelopt",
        "quant_algo": "MXFP8"}}"#;
    let minimax = r#"{"quantization_config": {"quant_method": "mxfp8"}}"#;
    let kimi_prefix = "language_model.model.layers.1.block_sparse_moe.experts";
    let quark_prefix = "model.layers.3.mlp.experts";
    let minimax_prefix = "model.layers.0.block_sparse_moe.experts";
    let w123 = ["w1", "w3", "w2"];
    let proj = ["gate_proj", "up_proj", "down_proj"];
    let cases = [
        (
            kimi_prefix,
            w123,
            ("weight_packed", Dtype::U8),
            Dtype::U8,
            2,
            Some(kimi),
        ),
        (
            quark_prefix,
            proj,
            ("weight", Dtype::U8),
            Dtype::U8,
            2,
            Some(quark),
        ),
        (
            quark_prefix,
            proj,
            ("weight", Dtype::U8),
            Dtype::U8,
            2,
            None,
        ),
        (
            minimax_prefix,
            w123,
            ("weight", Dtype::F8_E4M3),
            Dtype::U8,
            1,
            Some(modelopt),
        ),
        (
            minimax_prefix,
            w123,
            ("weight", Dtype::F8_E4M3),
            Dtype::F8_E8M0,
            1,
            Some(minimax),
        ),
        (
            minimax_prefix,
            w123,
            ("weight", Dtype::F8_E4M3),
            Dtype::U8,
            1,
            None,
        ),
    ];
    for (prefix, modules, weight, scale_dtype, pack, config) in cases {
        let tensors = mx_experts(prefix, modules, weight, ("weight_scale", scale_dtype), pack);
        let (_dir, ckpt) = open(&tensors, config);
        assert_mx(&layer(&ckpt), prefix, weight.1, pack, scale_dtype);
    }
}

#[test]
fn e8m0_block_scales_of_fp8_weights_stay_block_fp8() {
    // DeepSeek-V3.2-style ue8m0 `weight_scale_inv` over 128 × 128 blocks is not MX.
    let mut tensors = vec![];
    for e in 0..E {
        for (m, module) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
            let (rows, cols) = if m < 2 { (I, H) } else { (H, I) };
            let name = |last: &str| format!("model.layers.0.mlp.experts.{e}.{module}.{last}");
            tensors.push(matrix(
                name("weight"),
                Dtype::F8_E4M3,
                false,
                e,
                m,
                [rows, cols],
            ));
            let blocks = [rows.div_ceil(128), cols.div_ceil(128)];
            tensors.push(matrix(
                name("weight_scale_inv"),
                Dtype::F8_E8M0,
                true,
                e,
                m,
                blocks,
            ));
        }
    }
    let config = r#"{"quantization_config": {"quant_method": "fp8",
        "weight_block_size": [128, 128]}}"#;
    let (_dir, ckpt) = open(&tensors, Some(config));
    let layer = layer(&ckpt);
    let scale = layer.quantization.as_ref().unwrap().weight_scale();
    assert_eq!(scale.kind.name, "weight_scale_inv");
    assert_eq!(
        scale.grid,
        Grid::Block {
            rows: 128,
            cols: 128
        }
    );
    assert_eq!(layer.pack, 1);
}

/// Stored bytes of rows `rows`, columns `cols` of matrix `m` of expert `e`.
fn bytes_of(
    scale: bool,
    e: usize,
    m: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<u8> {
    rows.flat_map(|r| cols.clone().map(move |c| byte(scale, e, m, r, c)))
        .collect()
}

#[test]
fn rank_plans_take_the_rank_rows_and_columns_and_their_scales() {
    let (_dir, ckpt) = open(&deepseek_v4(), Some(V4_CONFIG));
    let layer = layer(&ckpt);
    // I=64: two 32-value blocks, so TP 2 splits on them and TP 4 cannot.
    assert!(layer.check_tp_split(2).is_ok());
    let err = layer.check_tp_split(4).unwrap_err();
    assert!(err.contains("tp_size that fit: 1, 2"), "{err}");
    // An EP rank with an EPLB replica (expert 2 twice), TP rank 1 of 2.
    let experts = [2, 0, 2];
    let request = LoadRequest {
        tp_rank: 1,
        tp_size: 2,
        experts: &experts,
        shard: None,
    };
    let shard = I / 2;
    let cases = [
        // (target, scale, stored columns of gate/up, of down's rank slice)
        (Target::W13, false, 0..H / 2),
        (Target::W13Companion("weight_scale"), true, 0..H / 32),
    ];
    for (target, scale, cols) in cases {
        let plan = CopyPlan::new(&ckpt, &layer, target, &request).unwrap();
        let want: Vec<u8> = experts
            .iter()
            .flat_map(|&e| {
                let gate = bytes_of(scale, e, 0, shard..2 * shard, cols.clone());
                gate.into_iter()
                    .chain(bytes_of(scale, e, 1, shard..2 * shard, cols.clone()))
            })
            .collect();
        assert_eq!(execute(&ckpt, &plan), want, "{target:?}");
    }
    let down = [
        (Target::W2, false, (shard / 2)..shard),
        (Target::W2Companion("weight_scale"), true, 1..2),
    ];
    for (target, scale, cols) in down {
        let plan = CopyPlan::new(&ckpt, &layer, target, &request).unwrap();
        let want: Vec<u8> = experts
            .iter()
            .flat_map(|&e| bytes_of(scale, e, 2, 0..H, cols.clone()))
            .collect();
        assert_eq!(execute(&ckpt, &plan), want, "{target:?}");
    }
}

#[test]
fn misshapen_or_mixed_mx_scales_are_layout_errors_naming_the_tensor() {
    // A scale of one per 16 values beside mxfp4 weights.
    let mut tensors = deepseek_v4();
    let bad = format!("{V4_PREFIX}.1.w3.scale");
    let at = tensors.iter().position(|t| t.name == bad).unwrap();
    tensors[at] = matrix(bad.clone(), Dtype::F8_E8M0, true, 1, 1, [I, H / 16]);
    let (_dir, ckpt) = open(&tensors, Some(V4_CONFIG));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(err.contains(&bad) && err.contains("[64, 4]"), "{err}");
    // Both a bare `scale` and a `weight_scale` beside the weights.
    let mut tensors = deepseek_v4();
    for e in 0..E {
        for (m, module) in ["w1", "w3", "w2"].iter().enumerate() {
            let (rows, cols) = if m < 2 { (I, H) } else { (H, I) };
            let name = format!("{V4_PREFIX}.{e}.{module}.weight_scale");
            tensors.push(matrix(name, Dtype::U8, true, e, m, [rows, cols / 32]));
        }
    }
    let (_dir, ckpt) = open(&tensors, Some(V4_CONFIG));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(err.contains("both `scale` and `weight_scale`"), "{err}");
}
