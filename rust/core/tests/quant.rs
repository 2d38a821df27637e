//! Quantized experts: fp8 weights with their scales, detected by name and config, and sliced
//! together for a TP rank and a list of experts, per-expert and fused.

mod common;

use common::{execute, layer, open, tensor, Tensor};
use fastmoe_load_core::{detect, Checkpoint, CopyPlan, Dtype, Grid, LoadRequest, MoeLayer, Target};

const PREFIX: &str = "model.layers.3.mlp.experts";
const DEEPSEEK_CONFIG: &str = r#"{"model_type": "deepseek_v3", "quantization_config":
    {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
     "weight_block_size": [128, 128]}}"#;

/// A distinct byte for every weight entry and a distinct f32 for every scale entry, so that
/// a wrong slice cannot go unnoticed.
fn byte(part: usize, e: usize, r: usize, c: usize) -> u8 {
    (part * 131 + e * 71 + r * 7 + c * 13) as u8
}

fn scale(part: usize, e: usize, r: usize, c: usize) -> f32 {
    (part * 1_000_000 + e * 10_000 + r * 100 + c) as f32
}

/// `(rows, cols)` of gate/up (`part` 0, 1) or down (2).
fn dims(part: usize, hidden: usize, inter: usize) -> (usize, usize) {
    if part < 2 {
        (inter, hidden)
    } else {
        (hidden, inter)
    }
}

/// A DeepSeek-V3-style per-expert layer: fp8 weights, 128 × 128 block scales in f32.
fn deepseek(experts: usize, hidden: usize, inter: usize) -> Vec<Tensor> {
    let mut out = Vec::new();
    for e in 0..experts {
        for (part, module) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
            let (rows, cols) = dims(part, hidden, inter);
            let w = (0..rows * cols)
                .map(|k| byte(part, e, k / cols, k % cols))
                .collect();
            out.push(tensor(
                format!("{PREFIX}.{e}.{module}.weight"),
                Dtype::F8_E4M3,
                &[rows, cols],
                w,
            ));
            let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
            let s = (0..sr * sc)
                .flat_map(|k| scale(part, e, k / sc, k % sc).to_le_bytes())
                .collect();
            out.push(tensor(
                format!("{PREFIX}.{e}.{module}.weight_scale_inv"),
                Dtype::F32,
                &[sr, sc],
                s,
            ));
        }
    }
    out
}

/// The same values as transformers v5 fuses them: `gate_up_proj [E, 2I, H]` with
/// `gate_up_proj_scale_inv [E, 2·ceil(I/128), ceil(H/128)]`, and down alike.
fn fused(experts: usize, hidden: usize, inter: usize) -> Vec<Tensor> {
    let (mut gu, mut gus, mut d, mut ds) = (vec![], vec![], vec![], vec![]);
    for e in 0..experts {
        for part in 0..3 {
            let (rows, cols) = dims(part, hidden, inter);
            let (w, s) = if part < 2 {
                (&mut gu, &mut gus)
            } else {
                (&mut d, &mut ds)
            };
            w.extend((0..rows * cols).map(|k| byte(part, e, k / cols, k % cols)));
            let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
            s.extend((0..sr * sc).flat_map(|k| scale(part, e, k / sc, k % sc).to_le_bytes()));
        }
    }
    let (h, i) = (hidden, inter);
    vec![
        tensor(
            format!("{PREFIX}.gate_up_proj"),
            Dtype::F8_E4M3,
            &[experts, 2 * i, h],
            gu,
        ),
        tensor(
            format!("{PREFIX}.gate_up_proj_scale_inv"),
            Dtype::F32,
            &[experts, 2 * i.div_ceil(128), h.div_ceil(128)],
            gus,
        ),
        tensor(
            format!("{PREFIX}.down_proj"),
            Dtype::F8_E4M3,
            &[experts, h, i],
            d,
        ),
        tensor(
            format!("{PREFIX}.down_proj_scale_inv"),
            Dtype::F32,
            &[experts, h.div_ceil(128), i.div_ceil(128)],
            ds,
        ),
    ]
}

/// What vLLM's `weight_loader` leaves in `w13_weight`/`w2_weight` and the block scales.
fn expected(
    target: &str,
    hidden: usize,
    inter: usize,
    tp: (usize, usize),
    experts: &[usize],
) -> Vec<u8> {
    let (rank, size) = tp;
    let shard = inter / size;
    let mut out = Vec::new();
    for &e in experts {
        match target {
            "w13" => {
                for part in 0..2 {
                    for r in rank * shard..(rank + 1) * shard {
                        out.extend((0..hidden).map(|c| byte(part, e, r, c)));
                    }
                }
            }
            "w2" => {
                for r in 0..hidden {
                    out.extend((rank * shard..(rank + 1) * shard).map(|c| byte(2, e, r, c)));
                }
            }
            "w13_scale" => {
                let rows = shard.div_ceil(128);
                for part in 0..2 {
                    for r in rank * rows..(rank + 1) * rows {
                        for c in 0..hidden.div_ceil(128) {
                            out.extend(scale(part, e, r, c).to_le_bytes());
                        }
                    }
                }
            }
            "w2_scale" => {
                let cols = shard.div_ceil(128);
                for r in 0..hidden.div_ceil(128) {
                    for c in rank * cols..(rank + 1) * cols {
                        out.extend(scale(2, e, r, c).to_le_bytes());
                    }
                }
            }
            other => panic!("{other}"),
        }
    }
    out
}

fn check_loads(ckpt: &Checkpoint, layer: &MoeLayer, hidden: usize, inter: usize) {
    let targets = [
        ("w13", Target::W13),
        ("w2", Target::W2),
        ("w13_scale", Target::W13Companion("weight_scale_inv")),
        ("w2_scale", Target::W2Companion("weight_scale_inv")),
    ];
    for (tp, experts) in [
        ((0, 1), vec![0, 1, 2]),
        ((1, 2), vec![2, 0, 2]),
        ((0, 2), vec![1]),
    ] {
        for (name, target) in targets {
            let request = LoadRequest {
                tp_rank: tp.0,
                tp_size: tp.1,
                experts: &experts,
                shard: None,
            };
            let plan = CopyPlan::new(ckpt, layer, target, &request).unwrap();
            assert_eq!(
                execute(ckpt, &plan),
                expected(name, hidden, inter, tp, &experts),
                "{name} tp={tp:?} experts={experts:?}"
            );
        }
    }
}

#[test]
fn per_expert_block_scales_slice_with_their_weights() {
    let (_dir, ckpt) = open(&deepseek(3, 384, 256), Some(DEEPSEEK_CONFIG));
    let layer = layer(&ckpt);
    let q = layer.quantization.as_ref().expect("quantized");
    assert_eq!(q.method, "fp8");
    assert_eq!(layer.dtype, Dtype::F8_E4M3);
    let scale = q.weight_scale();
    assert_eq!(
        (scale.kind.name, scale.grid, scale.dtype),
        (
            "weight_scale_inv",
            Grid::Block {
                rows: 128,
                cols: 128
            },
            Dtype::F32
        )
    );
    assert_eq!(layer.tensor_names().len(), 3 * 6);
    check_loads(&ckpt, &layer, 384, 256);
}

#[test]
fn fused_block_scales_slice_with_their_weights() {
    // No config.json: the 128 × 128 grid every block-scaled release uses.
    let (_dir, ckpt) = open(&fused(3, 384, 256), None);
    let layer = layer(&ckpt);
    assert_eq!(layer.format(), "fused");
    assert_eq!(
        layer.quantization.as_ref().unwrap().weight_scale().grid,
        Grid::Block {
            rows: 128,
            cols: 128
        }
    );
    check_loads(&ckpt, &layer, 384, 256);
}

#[test]
fn a_tp_split_inside_a_block_is_refused_with_the_sizes_that_fit() {
    // I = 384: tp=2 gives 192 rows per rank, which cuts the second 128-row block.
    let (_dir, ckpt) = open(&deepseek(2, 256, 384), Some(DEEPSEEK_CONFIG));
    let layer = layer(&ckpt);
    for target in [
        Target::W13,
        Target::W2,
        Target::W13Companion("weight_scale_inv"),
    ] {
        let request = LoadRequest {
            tp_rank: 1,
            tp_size: 2,
            experts: &[0, 1],
            shard: None,
        };
        let err = CopyPlan::new(&ckpt, &layer, target, &request)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tp_size=2 gives each rank 192"), "{err}");
        assert!(err.contains("tp_size that fit: 1, 3"), "{err}");
        assert!(err.contains("weight_scale_inv"), "{err}");
    }
    let request = LoadRequest {
        tp_rank: 2,
        tp_size: 3,
        experts: &[1],
        shard: None,
    };
    assert!(CopyPlan::new(&ckpt, &layer, Target::W13, &request).is_ok());
}

fn layout_error(tensors: &[Tensor], config: Option<&str>) -> String {
    let (_dir, ckpt) = open(tensors, config);
    detect(&ckpt, None).unwrap_err().to_string()
}

#[test]
fn inconsistent_quantized_groups_are_named() {
    let mut missing = deepseek(2, 256, 256);
    missing.retain(|t| t.name != format!("{PREFIX}.1.up_proj.weight_scale_inv"));
    let err = layout_error(&missing, Some(DEEPSEEK_CONFIG));
    assert!(
        err.contains(&format!("`{PREFIX}.1.up_proj.weight_scale_inv` is missing")),
        "{err}"
    );

    let mut no_scales = deepseek(2, 256, 256);
    no_scales.retain(|t| !t.name.ends_with("scale_inv"));
    let err = layout_error(&no_scales, None);
    assert!(err.contains("F8_E4M3 but have no scales"), "{err}");

    let mut bad_grid = deepseek(2, 256, 256);
    let gate = bad_grid
        .iter_mut()
        .find(|t| t.name.ends_with("0.gate_proj.weight_scale_inv"))
        .unwrap();
    gate.shape = vec![4, 1];
    gate.data.truncate(16);
    let err = layout_error(&bad_grid, Some(DEEPSEEK_CONFIG));
    assert!(
        err.contains("has shape [4, 1], which is no scale grid"),
        "{err}"
    );
    assert!(err.contains("expected [2, 2] (128×128 blocks)"), "{err}");

    let per_channel = r#"{"quantization_config": {"quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8,
        "type": "float", "strategy": "channel"}}}}}"#;
    let err = layout_error(&deepseek(2, 256, 256), Some(per_channel));
    assert!(
        err.contains("declares compressed-tensors with channel scales"),
        "{err}"
    );

    let mut bf16 = deepseek(2, 256, 256);
    for t in bf16.iter_mut().filter(|t| t.name.ends_with(".weight")) {
        t.dtype = Dtype::BF16;
        t.data = t.data.iter().flat_map(|b| [*b, 0]).collect();
    }
    let err = layout_error(&bf16, Some(DEEPSEEK_CONFIG));
    assert!(
        err.contains("but their weights are BF16, not float8"),
        "{err}"
    );
}

#[test]
fn per_channel_and_per_tensor_scales() {
    // compressed-tensors FP8: weight_scale [out, 1] per row, or one per tensor, and an
    // input scale that vLLM keeps once for gate and up.
    let (e, h, i) = (3, 64, 32);
    for per_row in [true, false] {
        let mut tensors = Vec::new();
        for x in 0..e {
            for (part, module) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
                let (rows, cols) = dims(part, h, i);
                let w = (0..rows * cols)
                    .map(|k| byte(part, x, k / cols, k % cols))
                    .collect();
                tensors.push(tensor(
                    format!("{PREFIX}.{x}.{module}.weight"),
                    Dtype::F8_E4M3,
                    &[rows, cols],
                    w,
                ));
                let (shape, n) = if per_row {
                    (vec![rows, 1], rows)
                } else {
                    (vec![], 1)
                };
                let s = (0..n)
                    .flat_map(|r| scale(part, x, r, 0).to_le_bytes())
                    .collect();
                tensors.push(tensor(
                    format!("{PREFIX}.{x}.{module}.weight_scale"),
                    Dtype::F32,
                    &shape,
                    s,
                ));
                let inp = scale(part, x, 99, 9).to_le_bytes().to_vec();
                tensors.push(tensor(
                    format!("{PREFIX}.{x}.{module}.input_scale"),
                    Dtype::F32,
                    &[1],
                    inp,
                ));
            }
        }
        let (_dir, ckpt) = open(&tensors, None);
        let layer = layer(&ckpt);
        let q = layer.quantization.as_ref().unwrap();
        assert_eq!(
            q.weight_scale().grid,
            if per_row { Grid::Row } else { Grid::Tensor }
        );
        assert!(q.companion("input_scale").is_some());
        let experts = [2, 0];
        let request = LoadRequest {
            tp_rank: 1,
            tp_size: 2,
            experts: &experts,
            shard: None,
        };
        let f32s = |plan: &CopyPlan| -> Vec<f32> {
            execute(&ckpt, plan)
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let plan = |t| CopyPlan::new(&ckpt, &layer, t, &request).unwrap();
        let (mut w13, mut w2, mut in13, mut in2) = (vec![], vec![], vec![], vec![]);
        for &x in &experts {
            for part in 0..2 {
                if per_row {
                    w13.extend((i / 2..i).map(|r| scale(part, x, r, 0)));
                } else {
                    w13.push(scale(part, x, 0, 0));
                }
            }
            // Down's rows are not split: every rank keeps all of them.
            if per_row {
                w2.extend((0..h).map(|r| scale(2, x, r, 0)));
            } else {
                w2.push(scale(2, x, 0, 0));
            }
            in13.push(scale(1, x, 99, 9));
            in2.push(scale(2, x, 99, 9));
        }
        assert_eq!(f32s(&plan(Target::W13Companion("weight_scale"))), w13);
        assert_eq!(f32s(&plan(Target::W2Companion("weight_scale"))), w2);
        assert_eq!(f32s(&plan(Target::W13Companion("input_scale"))), in13);
        assert_eq!(f32s(&plan(Target::W2Companion("input_scale"))), in2);
    }
}
