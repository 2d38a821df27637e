//! Plans executed into plain memory equal what the logical layer says, for every layout,
//! TP rank and expert placement.

mod common;

use std::sync::Arc;

use common::{to_u16, write, Logical, TempDir, Tensor};
use fastmoe_load_core::{
    detect, Checkpoint, CopyOp, CopyPlan, Executor, LoadRequest, MoeLayer, ReadMode, Result, Target,
};

const LAYER: Logical = Logical {
    experts: 5,
    hidden: 24,
    inter: 40,
};
const PREFIX: &str = "model.layers.0.mlp.experts";

/// Executes `ops` into a fresh buffer of `len` bytes holding destination bytes from `start`.
fn run(
    ckpt: &Checkpoint,
    mode: ReadMode,
    ops: &[CopyOp],
    start: usize,
    len: usize,
) -> Result<Vec<u8>> {
    let mut out = vec![0xAAu8; len];
    // SAFETY: `out` is `len` bytes and exclusively ours for the call.
    unsafe { Executor::new(3, mode).run(ckpt.shards(), ops, out.as_mut_ptr(), start, len) }?;
    Ok(out)
}

/// Writes `tensors` as `m.safetensors` in `dir`, opens the directory and detects its one
/// expert group.
fn one_layer(dir: &TempDir, tensors: &[Tensor]) -> (Checkpoint, MoeLayer) {
    write(&dir.path().join("m.safetensors"), tensors);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let layer = detect(&ckpt, None).unwrap().remove(0);
    (ckpt, layer)
}

fn targets(biases: bool) -> Vec<(&'static str, Target)> {
    let mut t = vec![("w13", Target::W13), ("w2", Target::W2)];
    if biases {
        t.extend([("w13_bias", Target::W13Bias), ("w2_bias", Target::W2Bias)]);
    }
    t
}

/// Loads every target for several TP ranks and expert lists and compares with the logical
/// layer, executing each plan both at once and window by window.
fn check_layout(
    tensors: Vec<Tensor>,
    format: &str,
    biases: bool,
    interleaved: Option<bool>,
    config: Option<&str>,
) {
    let dir = TempDir::new("load");
    write(&dir.path().join("model.safetensors"), &tensors);
    if let Some(config) = config {
        std::fs::write(dir.path().join("config.json"), config).unwrap();
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let layers = detect(&ckpt, interleaved).unwrap();
    assert_eq!(layers.len(), 1, "{layers:?}");
    let layer = &layers[0];
    assert_eq!(layer.prefix, PREFIX);
    assert_eq!(layer.format(), format);
    assert_eq!(
        (
            layer.num_experts,
            layer.hidden_size,
            layer.intermediate_size
        ),
        (5, 24, 40)
    );
    assert_eq!(layer.has_bias(), biases);

    let expert_lists: [&[usize]; 4] = [&[0, 1, 2, 3, 4], &[3, 4], &[4, 0, 2], &[1, 1, 3]];
    let mode = ReadMode::Read;
    for tp_size in [1, 2, 4] {
        for tp_rank in 0..tp_size {
            for experts in expert_lists {
                let request = LoadRequest {
                    tp_rank,
                    tp_size,
                    experts,
                    shard: None,
                };
                for (name, target) in targets(biases) {
                    let plan = CopyPlan::new(&ckpt, layer, target, &request).unwrap();
                    let expected = LAYER.expected(name, tp_rank, tp_size, experts);
                    assert_eq!(plan.len(), expected.len() * 2);

                    let whole = run(&ckpt, mode, plan.ops(), 0, plan.len()).unwrap();
                    assert!(
                        to_u16(&whole) == expected,
                        "{format} {name} tp {tp_rank}/{tp_size} experts {experts:?}"
                    );

                    let mut pieces = Vec::new();
                    for (start, end) in plan.windows(700) {
                        let ops = plan.ops_in(start, end).unwrap();
                        pieces.extend(run(&ckpt, mode, ops, start, end - start).unwrap());
                    }
                    assert!(pieces == whole, "{format} {name} windowed");
                }
            }
        }
    }
}

#[test]
fn fused_v5() {
    check_layout(
        LAYER.fused(PREFIX, false, false, false),
        "fused",
        false,
        None,
        None,
    );
}

#[test]
fn fused_transposed() {
    check_layout(
        LAYER.fused(PREFIX, true, false, false),
        "fused_transposed",
        false,
        None,
        None,
    );
}

#[test]
fn fused_transposed_interleaved_with_biases_from_config() {
    check_layout(
        LAYER.fused(PREFIX, true, true, true),
        "fused_transposed_interleaved",
        true,
        None,
        Some(r#"{"model_type": "gpt_oss"}"#),
    );
}

#[test]
fn fused_interleaved_by_override() {
    check_layout(
        LAYER.fused(PREFIX, false, true, true),
        "fused_interleaved",
        true,
        Some(true),
        None,
    );
}

/// Stored-order plans of transposed groups hold the entries of `new`'s plans, in the order
/// documented on `CopyPlan::stored_order`, for every TP rank and an expert list with a
/// repeat; other groups and the bias targets are refused.
#[test]
fn stored_order_plans_of_transposed_groups() {
    let (h, i) = (LAYER.hidden, LAYER.inter);
    for interleaved in [false, true] {
        let dir = TempDir::new("stored");
        let (ckpt, layer) = one_layer(&dir, &LAYER.fused(PREFIX, true, interleaved, true));
        let layer = if interleaved {
            detect(&ckpt, Some(true)).unwrap().remove(0)
        } else {
            layer
        };
        for tp_size in [1, 2, 4] {
            let shard = i / tp_size;
            for tp_rank in 0..tp_size {
                let experts = [3, 0, 3];
                let request = LoadRequest {
                    tp_rank,
                    tp_size,
                    experts: &experts,
                    shard: None,
                };
                let load = |target, stored: bool| {
                    let plan = if stored {
                        let plan = CopyPlan::stored_order(&ckpt, &layer, target, &request);
                        let plan = plan.unwrap();
                        // Plain strided copies of contiguous runs: no element gather.
                        assert!(plan.ops().iter().all(|op| op.has_contiguous_rows()));
                        plan
                    } else {
                        CopyPlan::new(&ckpt, &layer, target, &request).unwrap()
                    };
                    to_u16(&run(&ckpt, ReadMode::Map, plan.ops(), 0, plan.len()).unwrap())
                };
                let (w13, stored13) = (load(Target::W13, false), load(Target::W13, true));
                let (w2, stored2) = (load(Target::W2, false), load(Target::W2, true));
                for k in 0..experts.len() {
                    for half in 0..2 {
                        for r in 0..shard {
                            for c in 0..h {
                                let want = w13[((k * 2 + half) * shard + r) * h + c];
                                let at = if interleaved {
                                    ((k * h + c) * shard + r) * 2 + half
                                } else {
                                    ((k * 2 + half) * h + c) * shard + r
                                };
                                assert_eq!(
                                    stored13[at], want,
                                    "w13 {interleaved} {tp_rank}/{tp_size}"
                                );
                            }
                        }
                    }
                    for r in 0..h {
                        for c in 0..shard {
                            let want = w2[(k * h + r) * shard + c];
                            assert_eq!(stored2[(k * shard + c) * h + r], want, "w2");
                        }
                    }
                }
            }
        }
        let request = LoadRequest {
            tp_rank: 0,
            tp_size: 1,
            experts: &[0],
            shard: None,
        };
        let bias = CopyPlan::stored_order(&ckpt, &layer, Target::W13Bias, &request);
        assert!(bias.unwrap_err().to_string().contains("no stored order"));
    }
    let dir = TempDir::new("stored-v5");
    let (ckpt, layer) = one_layer(&dir, &LAYER.fused(PREFIX, false, false, false));
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0],
        shard: None,
    };
    let err = CopyPlan::stored_order(&ckpt, &layer, Target::W13, &request).unwrap_err();
    assert!(
        err.to_string().contains("destination order already"),
        "{err}"
    );
}

#[test]
fn per_expert_namings() {
    for modules in [
        ["gate_proj", "up_proj", "down_proj"],
        ["w1", "w3", "w2"],
        ["linear", "linear_v", "linear_1"],
    ] {
        check_layout(
            LAYER.per_expert(PREFIX, modules, false),
            "per_expert",
            false,
            None,
            None,
        );
    }
    check_layout(
        LAYER.per_expert(PREFIX, ["gate_proj", "up_proj", "down_proj"], true),
        "per_expert",
        true,
        None,
        None,
    );
}

#[test]
fn large_runs_are_cut_into_bounded_operations() {
    let big = Logical {
        experts: 2,
        hidden: 1024,
        inter: 1536,
    };
    let dir = TempDir::new("big");
    let (ckpt, layer) = one_layer(&dir, &big.fused(PREFIX, false, false, false));
    let layer = &layer;
    let request = LoadRequest {
        tp_rank: 1,
        tp_size: 2,
        experts: &[1, 0],
        shard: None,
    };
    let plan = CopyPlan::new(&ckpt, layer, Target::W13, &request).unwrap();
    assert!(plan
        .ops()
        .iter()
        .all(|op| op.len() <= fastmoe_load_core::plan::OP_BYTES));
    assert!(plan.ops().len() > 4);
    for mode in [ReadMode::Map, ReadMode::Read] {
        let out = run(&ckpt, mode, plan.ops(), 0, plan.len()).unwrap();
        assert!(
            to_u16(&out) == big.expected("w13", 1, 2, &[1, 0]),
            "{mode:?}"
        );
    }

    // Transposed rows longer than an operation are cut along their columns.
    let wide = Logical {
        experts: 1,
        hidden: 600_000,
        inter: 2,
    };
    let (ckpt, layer) = one_layer(&dir, &wide.fused(PREFIX, true, false, false));
    let layer = &layer;
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0],
        shard: None,
    };
    let plan = CopyPlan::new(&ckpt, layer, Target::W13, &request).unwrap();
    assert!(plan
        .ops()
        .iter()
        .all(|op| op.len() <= fastmoe_load_core::plan::OP_BYTES));
    let out = run(&ckpt, ReadMode::Read, plan.ops(), 0, plan.len()).unwrap();
    assert!(to_u16(&out) == wide.expected("w13", 0, 1, &[0]));
}

#[test]
fn bad_requests_are_refused() {
    let dir = TempDir::new("bad");
    let (ckpt, layer) = one_layer(&dir, &LAYER.fused(PREFIX, false, false, false));
    let layer = &layer;
    let cases: [(LoadRequest, Target, &str); 5] = [
        (
            LoadRequest {
                tp_rank: 2,
                tp_size: 2,
                experts: &[0],
                shard: None,
            },
            Target::W13,
            "tp_rank 2",
        ),
        (
            LoadRequest {
                tp_rank: 0,
                tp_size: 3,
                experts: &[0],
                shard: None,
            },
            Target::W2,
            "does not split",
        ),
        (
            LoadRequest {
                tp_rank: 0,
                tp_size: 0,
                experts: &[0],
                shard: None,
            },
            Target::W2,
            "tp_size=0",
        ),
        (
            LoadRequest {
                tp_rank: 0,
                tp_size: 1,
                experts: &[0, 5],
                shard: None,
            },
            Target::W13,
            "expert 5 does not exist",
        ),
        (
            LoadRequest {
                tp_rank: 0,
                tp_size: 1,
                experts: &[0],
                shard: None,
            },
            Target::W2Bias,
            "no expert biases",
        ),
    ];
    for (request, target, message) in cases {
        let err = CopyPlan::new(&ckpt, layer, target, &request)
            .unwrap_err()
            .to_string();
        assert!(err.contains(message) && err.contains(PREFIX), "{err}");
    }
}

#[test]
fn windows_must_fall_on_operation_boundaries() {
    let dir = TempDir::new("win");
    let (ckpt, layer) = one_layer(&dir, &LAYER.fused(PREFIX, true, false, false));
    let layer = &layer;
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0, 1],
        shard: None,
    };
    let plan = CopyPlan::new(&ckpt, layer, Target::W2, &request).unwrap();
    let first = plan.ops()[0].len();
    assert!(plan.ops_in(0, first).is_some());
    assert!(plan.ops_in(0, first - 1).is_none());
    assert!(plan.ops_in(1, first).is_none());
    assert!(plan.ops_in(0, plan.len() + 2).is_none());
}

#[test]
fn executor_refuses_operations_outside_the_window() {
    let dir = TempDir::new("outside");
    let (ckpt, layer) = one_layer(&dir, &LAYER.fused(PREFIX, false, false, false));
    let layer = &layer;
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0],
        shard: None,
    };
    let plan = CopyPlan::new(&ckpt, layer, Target::W2, &request).unwrap();
    // The window is one byte short: the executor must refuse before writing.
    assert!(run(&ckpt, ReadMode::Map, plan.ops(), 0, plan.len() - 1).is_err());
    let mut small = vec![0u8; plan.len()];
    let shards: Vec<Arc<_>> = Vec::new();
    // SAFETY: as above: no shard, so nothing may be read or written.
    let result = unsafe {
        Executor::new(1, ReadMode::Map).run(&shards, plan.ops(), small.as_mut_ptr(), 0, small.len())
    };
    assert!(result.is_err());
}

#[test]
fn reading_a_truncated_file_is_an_error_not_a_signal() {
    let big = Logical {
        experts: 2,
        hidden: 1024,
        inter: 512,
    };
    // Contiguous runs (pread in Read mode, the map in Map mode) and a TP=2 w2 slice, a
    // strided gather that reads the map in both modes.
    let cases = [(Target::W13, 1), (Target::W2, 2)];
    for mode in [ReadMode::Map, ReadMode::Read] {
        for (target, tp_size) in cases {
            let dir = TempDir::new("trunc");
            let path = dir.path().join("m.safetensors");
            write(&path, &big.fused(PREFIX, false, false, false));
            let ckpt = Checkpoint::open(&path).unwrap();
            let layer = &detect(&ckpt, None).unwrap()[0];
            let request = LoadRequest {
                tp_rank: 0,
                tp_size,
                experts: &[1],
                shard: None,
            };
            let plan = CopyPlan::new(&ckpt, layer, target, &request).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(4096)
                .unwrap();
            // No check before the copy: the copy itself meets the missing pages.
            let err = run(&ckpt, mode, plan.ops(), 0, plan.len()).unwrap_err();
            let case = format!("{mode:?} {target:?} tp_size={tp_size}");
            assert!(
                matches!(err, fastmoe_load_core::Error::FileChanged { .. }),
                "{case}: {err}"
            );
            assert!(err.to_string().contains("m.safetensors"), "{case}: {err}");
            // The shard stays marked: later loads fail before copying.
            let again = ckpt.check_intact([0]).unwrap_err();
            assert!(
                matches!(again, fastmoe_load_core::Error::FileChanged { .. }),
                "{case}"
            );
        }
    }
}

#[test]
fn dense_tensor_plans_copy_whole_tensors_and_shards_along_any_dimension() {
    let dir = TempDir::new("dense");
    let path = dir.path().join("m.safetensors");
    let shape = [6usize, 4, 10];
    let value = |i: usize, j: usize, k: usize| (i * 1000 + j * 100 + k) as u16;
    let values = (0..shape[0])
        .flat_map(|i| (0..shape[1]).flat_map(move |j| (0..shape[2]).map(move |k| value(i, j, k))));
    write(
        &path,
        &[
            common::tensor_u16("w", &shape, values),
            common::tensor_u16("s", &[], [7u16].into_iter()),
        ],
    );
    let ckpt = Checkpoint::open(&path).unwrap();

    let whole = CopyPlan::tensor(&ckpt, "w", None).unwrap();
    let out = to_u16(&run(&ckpt, ReadMode::Map, whole.ops(), 0, whole.len()).unwrap());
    assert_eq!(out.len(), 240);
    assert_eq!(out[40 + 2 * 10 + 3], value(1, 2, 3));
    let scalar = CopyPlan::tensor(&ckpt, "s", None).unwrap();
    assert_eq!(
        to_u16(&run(&ckpt, ReadMode::Map, scalar.ops(), 0, 2).unwrap()),
        [7]
    );

    for (dim, size) in [(0, 3), (1, 2), (2, 5), (2, 1)] {
        for rank in 0..size {
            let plan = CopyPlan::tensor(&ckpt, "w", Some((dim, rank, size))).unwrap();
            let mut sizes = shape;
            sizes[dim] /= size;
            let mut expected = Vec::new();
            for i in 0..sizes[0] {
                for j in 0..sizes[1] {
                    for k in 0..sizes[2] {
                        let mut at = [i, j, k];
                        at[dim] += rank * sizes[dim];
                        expected.push(value(at[0], at[1], at[2]));
                    }
                }
            }
            let out = run(&ckpt, ReadMode::Read, plan.ops(), 0, plan.len()).unwrap();
            assert_eq!(to_u16(&out), expected, "dim {dim} rank {rank}/{size}");
        }
    }
    for bad in [
        Some((3, 0, 1)),
        Some((0, 0, 4)),
        Some((1, 2, 2)),
        Some((0, 0, 0)),
    ] {
        let err = CopyPlan::tensor(&ckpt, "w", bad).unwrap_err().to_string();
        assert!(err.contains("`w`"), "{err}");
    }
    assert!(CopyPlan::tensor(&ckpt, "nope", None).is_err());
}
