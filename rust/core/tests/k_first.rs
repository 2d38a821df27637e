//! GPTQ and AWQ: weights and block companions stored input-first (`[in, out]`), planned into
//! input-first destinations (`CopyPlan::k_first`, vLLM's GPTQ/AWQ Marlin parameters) and into
//! `[out, in]` ones, against destinations built here by hand from each stored element's
//! coordinates.

mod common;

use common::{execute, layer, open, tensor, Tensor};
use fastmoe_load_core::{Checkpoint, CopyPlan, Dtype, LoadRequest, MoeLayer, Target};

const E: usize = 2;
const H: usize = 64;
const I: usize = 32;
const GROUP: usize = 16;
const MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// A stored element that says where it lies: kind, matrix, expert, stored row and column.
fn value(kind: u32, part: usize, e: usize, r: usize, c: usize) -> u32 {
    (kind << 28) | ((part as u32) << 24) | ((e as u32) << 20) | ((r as u32) << 10) | c as u32
}

/// `(suffix, dtype, stored [rows, cols] of gate/up, of down)` of each tensor of a matrix.
fn kinds(awq: bool) -> Vec<(&'static str, Dtype, [usize; 2], [usize; 2])> {
    let (weight_g, weight_d) = if awq {
        ([H, I / 8], [I, H / 8])
    } else {
        ([H / 8, I], [I / 8, H])
    };
    vec![
        ("qweight", Dtype::I32, weight_g, weight_d),
        ("qzeros", Dtype::I32, [H / GROUP, I / 8], [I / GROUP, H / 8]),
        // Scales are float16: the low half of the coordinates.
        ("scales", Dtype::F16, [H / GROUP, I], [I / GROUP, H]),
    ]
}

fn bytes_of(v: u32, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => (v as u16).to_le_bytes().to_vec(),
        _ => v.to_le_bytes().to_vec(),
    }
}

fn files(awq: bool) -> Vec<Tensor> {
    let mut tensors = Vec::new();
    for e in 0..E {
        for (part, module) in MODULES.iter().enumerate() {
            for (kind, (suffix, dtype, gate, down)) in kinds(awq).into_iter().enumerate() {
                let [rows, cols] = if part < 2 { gate } else { down };
                let data = (0..rows * cols)
                    .flat_map(|n| bytes_of(value(kind as u32, part, e, n / cols, n % cols), dtype))
                    .collect();
                let name = format!("model.layers.0.mlp.experts.{e}.{module}.{suffix}");
                tensors.push(tensor(name, dtype, &[rows, cols], data));
            }
            if !awq {
                let inputs = if part < 2 { H } else { I };
                let g_idx = (0..inputs)
                    .flat_map(|i| ((i / GROUP) as i32).to_le_bytes())
                    .collect();
                let name = format!("model.layers.0.mlp.experts.{e}.{module}.g_idx");
                tensors.push(tensor(name, Dtype::I32, &[inputs], g_idx));
            }
        }
    }
    tensors
}

fn config(awq: bool) -> String {
    if awq {
        format!(
            r#"{{"quantization_config": {{"quant_method": "awq", "bits": 4, "group_size": {GROUP},
               "zero_point": true, "version": "gemm"}}}}"#
        )
    } else {
        format!(
            r#"{{"quantization_config": {{"quant_method": "gptq", "bits": 4, "group_size": {GROUP},
               "desc_act": false, "sym": true}}}}"#
        )
    }
}

fn plan(
    ckpt: &Checkpoint,
    layer: &MoeLayer,
    target: Target,
    (rank, tp): (usize, usize),
    k_first: bool,
) -> CopyPlan {
    let experts = [1, 0, 1];
    let request = LoadRequest {
        tp_rank: rank,
        tp_size: tp,
        experts: &experts,
        shard: None,
    };
    let build = if k_first {
        CopyPlan::k_first
    } else {
        CopyPlan::new
    };
    build(ckpt, layer, target, &request).unwrap()
}

/// What a destination holds for experts 1, 0, 1: the stored `[in', out']` tensors with gate's
/// and up's columns `cols` side by side (or down's rows `rows`), transposed per expert where
/// the destination is `[out, in]`.
fn expected(
    kind: usize,
    awq: bool,
    down: bool,
    range: std::ops::Range<usize>,
    k_first: bool,
) -> Vec<u8> {
    let (_, dtype, gate, down_shape) = kinds(awq)[kind];
    let mut out = Vec::new();
    for e in [1, 0, 1] {
        // The destination per expert as stored coordinates (part, r, c), input-first.
        let rows: Vec<Vec<(usize, usize, usize)>> = if down {
            range
                .clone()
                .map(|r| (0..down_shape[1]).map(|c| (2, r, c)).collect())
                .collect()
        } else {
            (0..gate[0])
                .map(|r| {
                    [0, 1]
                        .iter()
                        .flat_map(|&p| range.clone().map(move |c| (p, r, c)))
                        .collect()
                })
                .collect()
        };
        let cells: Vec<(usize, usize, usize)> = if k_first {
            rows.concat()
        } else {
            (0..rows[0].len())
                .flat_map(|c| rows.iter().map(move |row| row[c]))
                .collect()
        };
        for (p, r, c) in cells {
            out.extend(bytes_of(value(kind as u32, p, e, r, c), dtype));
        }
    }
    out
}

fn check(awq: bool, tp: (usize, usize)) {
    let (_dir, ckpt) = open(&files(awq), Some(&config(awq)));
    let layer = layer(&ckpt);
    assert!(layer.k_first());
    assert_eq!((layer.hidden_size, layer.intermediate_size), (H, I));
    assert_eq!(
        (layer.pack, layer.out_pack()),
        if awq { (1, 8) } else { (8, 1) }
    );
    assert_eq!(layer.discarded().len(), if awq { 0 } else { 3 * E });
    let (rank, size) = tp;
    let shard = I / size;
    for k_first in [true, false] {
        for (kind, (suffix, _, _, _)) in kinds(awq).into_iter().enumerate() {
            let (w13, w2) = match suffix {
                "qweight" => (Target::W13, Target::W2),
                kind => (
                    Target::W13Companion(kind_name(kind)),
                    Target::W2Companion(kind_name(kind)),
                ),
            };
            // Stored elements per output column of gate/up, per input row of down.
            let (out_per, in_per) = match suffix {
                "qweight" if awq => (8, 1),
                "qweight" => (1, 8),
                "qzeros" => (8, GROUP),
                _ => (1, GROUP),
            };
            let cols = rank * shard / out_per..(rank + 1) * shard / out_per;
            let rows = rank * shard / in_per..(rank + 1) * shard / in_per;
            let got = execute(&ckpt, &plan(&ckpt, &layer, w13, tp, k_first));
            assert_eq!(
                got,
                expected(kind, awq, false, cols, k_first),
                "w13 {suffix} {k_first}"
            );
            let got = execute(&ckpt, &plan(&ckpt, &layer, w2, tp, k_first));
            assert_eq!(
                got,
                expected(kind, awq, true, rows, k_first),
                "w2 {suffix} {k_first}"
            );
        }
    }
}

fn kind_name(kind: &str) -> &'static str {
    fastmoe_load_core::quant::companion_kind(kind).unwrap().name
}

#[test]
fn gptq_lands_input_first_and_as_out_in() {
    check(false, (0, 1));
    check(false, (1, 2));
}

#[test]
fn awq_lands_input_first_and_as_out_in() {
    check(true, (0, 1));
    check(true, (1, 2));
}

#[test]
fn input_first_plans_of_gptq_are_runs_of_the_file() {
    let (_dir, ckpt) = open(&files(false), Some(&config(false)));
    let layer = layer(&ckpt);
    let w2 = plan(&ckpt, &layer, Target::W2, (1, 2), true);
    // Down's rows of the rank are one run per expert.
    assert!(w2
        .ops()
        .iter()
        .all(|op| op.rows == 1 && op.has_contiguous_rows()));
    assert_eq!(w2.ops().len(), 3);
    let w13 = plan(&ckpt, &layer, Target::W13, (1, 2), true);
    // One run per stored row of gate, and of up.
    assert_eq!(w13.ops().len(), 3 * 2 * H / 8);
}

#[test]
fn a_split_off_the_groups_names_the_sizes_that_fit() {
    let (_dir, ckpt) = open(&files(false), Some(&config(false)));
    let layer = layer(&ckpt);
    let err = layer.check_tp_split(4).unwrap_err();
    assert!(err.contains("16-value blocks"), "{err}");
    assert!(err.contains("tp_size that fit: 1, 2"), "{err}");
}

#[test]
fn g_idx_of_another_shape_is_named() {
    let mut tensors = files(false);
    let g_idx = tensors
        .iter_mut()
        .find(|t| t.name.ends_with("1.up_proj.g_idx"))
        .unwrap();
    g_idx.shape = vec![H / 2];
    g_idx.data.truncate(H / 2 * 4);
    let (_dir, ckpt) = open(&tensors, Some(&config(false)));
    let err = fastmoe_load_core::detect(&ckpt, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("up_proj.g_idx` is I32 [32]"), "{err}");
    assert!(err.contains("one I32 per input, [64]"), "{err}");
}
