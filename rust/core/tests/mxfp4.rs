//! gpt-oss' mxfp4 experts (`gate_up_proj_blocks [E, 2I, H/32, 16]` uint8 with e8m0
//! `gate_up_proj_scales [E, 2I, H/32]`, gate and up interleaved along the rows), and plans that
//! keep gate and up interleaved in w13 (`CopyPlan::interleaved`) from interleaved and from
//! concatenated files.

mod common;

use common::{execute, layer, open, Tensor};
use fastmoe_load_core::{detect, CopyPlan, Dtype, Grid, LoadRequest, Target};

const PREFIX: &str = "model.layers.0.mlp.experts";
const CONFIG: &str = r#"{"model_type": "gpt_oss", "quantization_config":
    {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}"#;
const E: usize = 3;
const H: usize = 64;
const I: usize = 64;

/// A distinct byte for every stored entry: `tensor` numbers the tensor, `(e, r, c)` its entry.
fn byte(tensor: usize, e: usize, r: usize, c: usize) -> u8 {
    (tensor * 101 + e * 71 + r * 7 + c * 13) as u8
}

fn filled(name: &str, dtype: Dtype, shape: &[usize], tensor: usize) -> Tensor {
    let size = if dtype == Dtype::BF16 { 2 } else { 1 };
    let len = shape.iter().product::<usize>() * size;
    // Bytes of one expert, and of one row of it (one entry of a bias `[E, n]`).
    let (expert, row) = (len / shape[0], len / shape[0] / shape[1]);
    let data = (0..len)
        .map(|k| byte(tensor, k / expert, k % expert / row, k % row))
        .collect();
    Tensor {
        name: format!("{PREFIX}.{name}"),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// gpt-oss' experts as released, gate/up rows interleaved; bf16 biases.
fn gpt_oss() -> Vec<Tensor> {
    vec![
        filled("gate_up_proj_blocks", Dtype::U8, &[E, 2 * I, H / 32, 16], 0),
        filled("gate_up_proj_scales", Dtype::U8, &[E, 2 * I, H / 32], 1),
        filled("down_proj_blocks", Dtype::U8, &[E, H, I / 32, 16], 2),
        filled("down_proj_scales", Dtype::U8, &[E, H, I / 32], 3),
        filled("gate_up_proj_bias", Dtype::BF16, &[E, 2 * I], 4),
        filled("down_proj_bias", Dtype::BF16, &[E, H], 5),
    ]
}

/// Stored bytes `[rows, cols)` of rows `rows` of expert `e` of a `[E, R, C]` tensor (C bytes).
fn rows_of(tensor: usize, e: usize, rows: impl Iterator<Item = usize>, cols: usize) -> Vec<u8> {
    rows.flat_map(|r| (0..cols).map(move |c| byte(tensor, e, r, c)))
        .collect()
}

#[test]
fn gpt_oss_mxfp4_is_an_interleaved_packed_group_with_block_scales() {
    let (_dir, ckpt) = open(&gpt_oss(), Some(CONFIG));
    let layer = layer(&ckpt);
    assert_eq!(layer.format(), "fused_interleaved");
    assert_eq!(
        (
            layer.num_experts,
            layer.hidden_size,
            layer.intermediate_size
        ),
        (E, H, I)
    );
    assert_eq!((layer.dtype, layer.pack), (Dtype::U8, 2));
    let q = layer.quantization.as_ref().expect("quantized");
    assert_eq!(q.method, "mxfp4");
    let scale = q.weight_scale();
    assert_eq!(scale.kind.name, "weight_scale");
    assert_eq!(scale.grid, Grid::Block { rows: 1, cols: 32 });
    assert_eq!(scale.dtype, Dtype::U8);
    // A split must fall on the 32-value blocks: I=64 splits in two, not in four.
    assert!(layer.check_tp_split(2).is_ok());
    let err = layer.check_tp_split(4).unwrap_err();
    assert!(err.contains("tp_size that fit: 1, 2"), "{err}");
}

#[test]
fn rank_plans_read_gate_then_up_or_pairs() {
    let (_dir, ckpt) = open(&gpt_oss(), Some(CONFIG));
    let layer = layer(&ckpt);
    let experts = [2, 0];
    let request = LoadRequest {
        tp_rank: 1,
        tp_size: 2,
        experts: &experts,
        shard: None,
    };
    let shard = I / 2;
    // Stored columns: H/2 bytes of weights and H/32 scales a row.
    for (target, tensor, cols) in [
        (Target::W13, 0, H / 2),
        (Target::W13Companion("weight_scale"), 1, H / 32),
    ] {
        let apart = CopyPlan::new(&ckpt, &layer, target, &request).unwrap();
        let pairs = CopyPlan::interleaved(&ckpt, &layer, target, &request).unwrap();
        let (mut want_apart, mut want_pairs) = (vec![], vec![]);
        for &e in &experts {
            let gate = (shard..2 * shard).map(|r| 2 * r);
            let up = (shard..2 * shard).map(|r| 2 * r + 1);
            want_apart.extend(rows_of(tensor, e, gate.chain(up), cols));
            want_pairs.extend(rows_of(tensor, e, 2 * shard..4 * shard, cols));
        }
        assert_eq!(execute(&ckpt, &apart), want_apart, "{target:?}");
        assert_eq!(execute(&ckpt, &pairs), want_pairs, "{target:?} interleaved");
        // The pairs of one expert are one run of the file.
        let runs = pairs.ops().iter().map(|op| op.rows).sum::<usize>();
        assert!(runs <= 2 * experts.len(), "{target:?}: {runs} runs");
    }
    // Down: the rank's columns, 16 bytes and one scale of every row.
    let w2 = CopyPlan::interleaved(&ckpt, &layer, Target::W2, &request).unwrap();
    let want: Vec<u8> = experts
        .iter()
        .flat_map(|&e| (0..H).flat_map(move |r| (16..32).map(move |c| byte(2, e, r, c))))
        .collect();
    assert_eq!(execute(&ckpt, &w2), want);
}

#[test]
fn interleaved_plans_from_concatenated_files_alternate_rows() {
    // The same bytes with gate rows then up rows per expert, as `convert` would write them.
    let mut tensors = gpt_oss();
    for t in tensors.iter_mut().filter(|t| t.name.contains("gate_up")) {
        let row = t.data.len() / E / (2 * I);
        let mut data = Vec::with_capacity(t.data.len());
        for e in 0..E {
            let expert = &t.data[e * 2 * I * row..(e + 1) * 2 * I * row];
            for half in 0..2 {
                for r in 0..I {
                    let at = (2 * r + half) * row;
                    data.extend_from_slice(&expert[at..at + row]);
                }
            }
        }
        t.data = data;
    }
    // mxfp4 names mean interleaved unless told otherwise (the record `convert` writes, or
    // the caller); without config.json too.
    let (_dir, concatenated) = open(&tensors, None);
    let (_dir2, interleaved) = open(&gpt_oss(), None);
    let from_pairs = layer(&interleaved);
    assert_eq!(from_pairs.format(), "fused_interleaved");
    let from_apart = detect(&concatenated, Some(false)).unwrap().remove(0);
    assert_eq!(from_apart.format(), "fused");
    for (tp_rank, tp_size) in [(0, 1), (1, 2)] {
        let request = LoadRequest {
            tp_rank,
            tp_size,
            experts: &[1, 2, 1],
            shard: None,
        };
        for target in [
            Target::W13,
            Target::W13Bias,
            Target::W13Companion("weight_scale"),
        ] {
            let a = CopyPlan::interleaved(&concatenated, &from_apart, target, &request).unwrap();
            let b = CopyPlan::interleaved(&interleaved, &from_pairs, target, &request).unwrap();
            assert_eq!(
                execute(&concatenated, &a),
                execute(&interleaved, &b),
                "{target:?} tp {tp_rank}/{tp_size}"
            );
        }
    }
}
