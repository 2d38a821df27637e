//! Packed quantized experts: NVFP4 (ModelOpt: uint8 weights of two e2m1 values a byte,
//! float8 16-value group scales, `weight_scale_2`, input scales) and int4 (compressed-tensors
//! `pack-quantized`: int32 `weight_packed` of eight values, group scales, `weight_shape`, and
//! the zero points of asymmetric weights, packed eight rows an int32). Views count stored
//! elements, plans slice every companion with its weights for a TP rank and a list of
//! experts, and a TP split that cuts a pack or a scale group is refused.

mod common;

use std::ops::Range;

use common::{execute, layer, open, tensor, Tensor};
use fastmoe_load_core::{
    detect, Checkpoint, CopyPlan, Dtype, Grid, LoadRequest, MatrixView, MoeLayer, Part, Target,
};

const PREFIX: &str = "model.layers.1.mlp.experts";
const MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
const EXPERTS: usize = 3;
const HIDDEN: usize = 256;
const INTER: usize = 128;
/// TP rank 1 of 2, experts placed out of order and one twice (an EPLB replica).
const TP: (usize, usize) = (1, 2);
const LOCAL: [usize; 3] = [2, 0, 2];

/// A distinct 32-bit value for every stored element of every tensor (`kind` tells the
/// tensors of one matrix apart), so that a wrong slice cannot go unnoticed.
fn value(kind: usize, part: usize, e: usize, r: usize, c: usize) -> u32 {
    let key = (kind as u64) << 56 ^ (part as u64) << 48 ^ (e as u64) << 40;
    let mut x = (key ^ (r as u64) << 20 ^ c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    (x >> 32) as u32
}

/// The little-endian bytes of `rows × cols` elements of `elem` bytes, row after row.
fn rect(
    kind: usize,
    part: usize,
    e: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    elem: usize,
) -> Vec<u8> {
    rows.flat_map(|r| {
        cols.clone()
            .flat_map(move |c| value(kind, part, e, r, c).to_le_bytes()[..elem].to_vec())
    })
    .collect()
}

/// One stored companion or weight kind of a per-expert group.
struct Kind {
    /// The name after the module (`weight_packed`, `weight_scale`, ...).
    name: &'static str,
    dtype: Dtype,
    elem: usize,
    /// Stored `(rows, cols)` of the tensor beside a `rows × cols` weight; `None` for a scalar.
    shape: fn(usize, usize) -> Option<(usize, usize)>,
}

fn per_expert(kinds: &[Kind]) -> Vec<Tensor> {
    let mut out = Vec::new();
    for e in 0..EXPERTS {
        for (part, module) in MODULES.iter().enumerate() {
            let (rows, cols) = if part < 2 {
                (INTER, HIDDEN)
            } else {
                (HIDDEN, INTER)
            };
            for (k, kind) in kinds.iter().enumerate() {
                let name = format!("{PREFIX}.{e}.{module}.{}", kind.name);
                let (shape, data) = match (kind.shape)(rows, cols) {
                    Some((r, c)) => (vec![r, c], rect(k, part, e, 0..r, 0..c, kind.elem)),
                    None => (vec![], rect(k, part, e, 0..1, 0..1, kind.elem)),
                };
                out.push(tensor(name, kind.dtype, &shape, data));
            }
        }
    }
    out
}

const NVFP4: [Kind; 4] = [
    Kind {
        name: "weight",
        dtype: Dtype::U8,
        elem: 1,
        shape: |r, c| Some((r, c / 2)),
    },
    Kind {
        name: "weight_scale",
        dtype: Dtype::F8_E4M3,
        elem: 1,
        shape: |r, c| Some((r, c / 16)),
    },
    Kind {
        name: "weight_scale_2",
        dtype: Dtype::F32,
        elem: 4,
        shape: |_, _| None,
    },
    Kind {
        name: "input_scale",
        dtype: Dtype::F32,
        elem: 4,
        shape: |_, _| None,
    },
];

const NVFP4_CONFIG: &str = r#"{"quantization_config": {"quant_method": "modelopt",
    "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}"#;

/// compressed-tensors int4 of `group`-value groups; `weight_shape` is written as the
/// weight's `[rows, cols]` by `int4_files`.
fn int4(group: usize, zero_points: bool) -> Vec<Kind> {
    let scale_shape: fn(usize, usize) -> Option<(usize, usize)> = match group {
        32 => |r, c| Some((r, c / 32)),
        4 => |r, c| Some((r, c / 4)),
        _ => unreachable!("groups of 32 (the releases') or 4 (to cut a pack alone)"),
    };
    let mut kinds = vec![
        Kind {
            name: "weight_packed",
            dtype: Dtype::I32,
            elem: 4,
            shape: |r, c| Some((r, c / 8)),
        },
        Kind {
            name: "weight_scale",
            dtype: Dtype::BF16,
            elem: 2,
            shape: scale_shape,
        },
        Kind {
            name: "weight_shape",
            dtype: Dtype::I32,
            elem: 4,
            shape: |_, _| Some((1, 2)),
        },
    ];
    if zero_points {
        kinds.push(Kind {
            name: "weight_zero_point",
            dtype: Dtype::I32,
            elem: 4,
            shape: match group {
                32 => |r, c| Some((r / 8, c / 32)),
                _ => |r, c| Some((r / 8, c / 4)),
            },
        });
    }
    kinds
}

fn int4_files(group: usize, zero_points: bool) -> Vec<Tensor> {
    let mut tensors = per_expert(&int4(group, zero_points));
    // `weight_shape` is one-dimensional in the files, and records the weight's values.
    for t in tensors
        .iter_mut()
        .filter(|t| t.name.ends_with(".weight_shape"))
    {
        t.shape = vec![2];
        t.data = weight_shape(t.name.contains(".down_proj."));
    }
    tensors
}

/// The bytes of the int32 `[rows, cols]` of gate/up or (`down`) down.
fn weight_shape(down: bool) -> Vec<u8> {
    let (rows, cols) = if down {
        (HIDDEN, INTER)
    } else {
        (INTER, HIDDEN)
    };
    [rows as i32, cols as i32]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn int4_config(group: usize, symmetric: bool) -> String {
    format!(
        r#"{{"quantization_config": {{"quant_method": "compressed-tensors",
        "format": "pack-quantized", "config_groups": {{"group_0": {{"targets": ["Linear"],
        "weights": {{"num_bits": 4, "type": "int", "symmetric": {symmetric},
        "strategy": "group", "group_size": {group}, "dynamic": false}}}}}}}}}}"#
    )
}

fn plan(ckpt: &Checkpoint, layer: &MoeLayer, target: Target, tp: (usize, usize)) -> CopyPlan {
    let request = LoadRequest {
        tp_rank: tp.0,
        tp_size: tp.1,
        experts: &LOCAL,
        shard: None,
    };
    CopyPlan::new(ckpt, layer, target, &request).unwrap()
}

/// What vLLM keeps of kind `k` for the local experts: gate's then up's rows `rows` of each
/// expert (all stored columns), or down's stored columns `cols` (all rows).
fn w13(k: usize, rows: Range<usize>, cols: usize, elem: usize) -> Vec<u8> {
    LOCAL
        .iter()
        .flat_map(|&e| [0, 1].map(|part| rect(k, part, e, rows.clone(), 0..cols, elem)))
        .flatten()
        .collect()
}

fn w2(k: usize, rows: usize, cols: Range<usize>, elem: usize) -> Vec<u8> {
    LOCAL
        .iter()
        .flat_map(|&e| rect(k, 2, e, 0..rows, cols.clone(), elem))
        .collect()
}

/// The `(rows, cols, row_stride, col_stride)` of a view, in stored elements.
fn dims(view: MatrixView) -> (usize, usize, usize, usize) {
    (view.rows, view.cols, view.row_stride, view.col_stride)
}

#[test]
fn nvfp4_weights_hold_two_values_a_byte() {
    let (_dir, ckpt) = open(&per_expert(&NVFP4), Some(NVFP4_CONFIG));
    let layer = layer(&ckpt);
    assert_eq!((layer.dtype, layer.pack), (Dtype::U8, 2));
    assert_eq!(
        (layer.hidden_size, layer.intermediate_size),
        (HIDDEN, INTER)
    );
    let q = layer.quantization.as_ref().unwrap();
    assert_eq!(q.method, "modelopt");
    let grids: Vec<_> = q
        .companions
        .iter()
        .map(|c| (c.kind.name, c.grid, c.dtype, c.merged_w13))
        .collect();
    assert_eq!(
        grids,
        [
            ("input_scale", Grid::Tensor, Dtype::F32, false), // vLLM keeps gate's and up's
            (
                "weight_scale",
                Grid::Block { rows: 1, cols: 16 },
                Dtype::F8_E4M3,
                false
            ),
            ("weight_scale_2", Grid::Tensor, Dtype::F32, false),
        ]
    );
    // Views count stored bytes: [I, H/2], [H, I/2]; scales [I, H/16], [H, I/16], [1, 1].
    let (h, i) = (HIDDEN, INTER);
    assert_eq!(
        dims(layer.matrix(Part::Up, 1).unwrap()),
        (i, h / 2, h / 2, 1)
    );
    assert_eq!(
        dims(layer.matrix(Part::Down, 1).unwrap()),
        (h, i / 2, i / 2, 1)
    );
    let scale = |part| layer.companion_matrix("weight_scale", part, 1).unwrap();
    assert_eq!(dims(scale(Part::Gate)), (i, h / 16, h / 16, 1));
    assert_eq!(dims(scale(Part::Down)), (h, i / 16, i / 16, 1));
    let global = layer
        .companion_matrix("weight_scale_2", Part::Down, 1)
        .unwrap();
    assert_eq!(dims(global), (1, 1, 1, 1));

    let (rank, size) = TP;
    let shard = i / size;
    let rows = rank * shard..(rank + 1) * shard;
    let load = |target| execute(&ckpt, &plan(&ckpt, &layer, target, TP));
    assert_eq!(load(Target::W13), w13(0, rows.clone(), h / 2, 1));
    assert_eq!(
        load(Target::W2),
        w2(0, h, rank * shard / 2..(rank + 1) * shard / 2, 1)
    );
    let scales = Target::W13Companion("weight_scale");
    assert_eq!(load(scales), w13(1, rows, h / 16, 1));
    let scales = Target::W2Companion("weight_scale");
    assert_eq!(
        load(scales),
        w2(1, h, rank * shard / 16..(rank + 1) * shard / 16, 1)
    );
    // Per-tensor kinds: gate's and up's value for w13 ([E, 2]), down's for w2 ([E]).
    for (k, kind) in [(2, "weight_scale_2"), (3, "input_scale")] {
        assert_eq!(
            load(Target::W13Companion(kind)),
            w13(k, 0..1, 1, 4),
            "{kind}"
        );
        assert_eq!(load(Target::W2Companion(kind)), w2(k, 1, 0..1, 4), "{kind}");
    }
}

#[test]
fn int4_weights_hold_eight_values_an_int32() {
    let (_dir, ckpt) = open(&int4_files(32, false), Some(&int4_config(32, true)));
    let layer = layer(&ckpt);
    assert_eq!((layer.dtype, layer.pack), (Dtype::I32, 8));
    assert_eq!(
        (layer.hidden_size, layer.intermediate_size),
        (HIDDEN, INTER)
    );
    let q = layer.quantization.as_ref().unwrap();
    assert_eq!(q.method, "compressed-tensors");
    let scale = q.weight_scale();
    assert_eq!(
        (scale.kind.name, scale.grid, scale.dtype),
        (
            "weight_scale",
            Grid::Block { rows: 1, cols: 32 },
            Dtype::BF16
        )
    );
    let shape = q.companion("weight_shape").unwrap();
    assert_eq!((shape.grid, shape.merged_w13), (Grid::Whole(2), true));
    assert!(q.companion("weight_zero_point").is_none());
    let (h, i) = (HIDDEN, INTER);
    assert_eq!(
        dims(layer.matrix(Part::Gate, 2).unwrap()),
        (i, h / 8, h / 8, 1)
    );
    assert_eq!(
        dims(layer.matrix(Part::Down, 2).unwrap()),
        (h, i / 8, i / 8, 1)
    );
    let view = |kind, part| dims(layer.companion_matrix(kind, part, 2).unwrap());
    assert_eq!(view("weight_scale", Part::Up), (i, h / 32, h / 32, 1));
    assert_eq!(view("weight_scale", Part::Down), (h, i / 32, i / 32, 1));
    assert_eq!(view("weight_shape", Part::Down), (1, 2, 2, 1));

    let (rank, size) = TP;
    let shard = i / size;
    let rows = rank * shard..(rank + 1) * shard;
    let load = |target| execute(&ckpt, &plan(&ckpt, &layer, target, TP));
    assert_eq!(load(Target::W13), w13(0, rows.clone(), h / 8, 4));
    assert_eq!(
        load(Target::W2),
        w2(0, h, rank * shard / 8..(rank + 1) * shard / 8, 4)
    );
    assert_eq!(
        load(Target::W13Companion("weight_scale")),
        w13(1, rows, h / 32, 2)
    );
    let scales = Target::W2Companion("weight_scale");
    assert_eq!(
        load(scales),
        w2(1, h, rank * shard / 32..(rank + 1) * shard / 32, 2)
    );
    // vLLM keeps one `weight_shape` per expert for gate and up: the up projection's.
    let shapes = |down| {
        LOCAL
            .iter()
            .flat_map(|_| weight_shape(down))
            .collect::<Vec<u8>>()
    };
    assert_eq!(load(Target::W13Companion("weight_shape")), shapes(false));
    assert_eq!(load(Target::W2Companion("weight_shape")), shapes(true));
}

#[test]
fn int4_zero_points_are_packed_eight_rows_an_int32() {
    let (_dir, ckpt) = open(&int4_files(32, true), Some(&int4_config(32, false)));
    let layer = layer(&ckpt);
    let q = layer.quantization.as_ref().unwrap();
    let zp = q.companion("weight_zero_point").unwrap();
    assert_eq!(
        (zp.grid, zp.dtype, zp.merged_w13),
        (Grid::Block { rows: 8, cols: 32 }, Dtype::I32, false)
    );
    let (h, i) = (HIDDEN, INTER);
    let view = |part| {
        dims(
            layer
                .companion_matrix("weight_zero_point", part, 0)
                .unwrap(),
        )
    };
    assert_eq!(view(Part::Gate), (i / 8, h / 32, h / 32, 1));
    assert_eq!(view(Part::Down), (h / 8, i / 32, i / 32, 1));
    for tp in [(0, 1), TP, (3, 4)] {
        let (rank, size) = tp;
        let shard = i / size;
        let load = |target| execute(&ckpt, &plan(&ckpt, &layer, target, tp));
        // Gate's then up's packs of the rank's rows; down's rows whole, its groups split.
        let packs = rank * shard / 8..(rank + 1) * shard / 8;
        assert_eq!(
            load(Target::W13Companion("weight_zero_point")),
            w13(3, packs, h / 32, 4)
        );
        let groups = rank * shard / 32..(rank + 1) * shard / 32;
        assert_eq!(
            load(Target::W2Companion("weight_zero_point")),
            w2(3, h / 8, groups, 4)
        );
    }
}

fn split_error(tensors: &[Tensor], config: Option<&str>, tp_size: usize) -> String {
    let (_dir, ckpt) = open(tensors, config);
    let layer = layer(&ckpt);
    let request = LoadRequest {
        tp_rank: 0,
        tp_size,
        experts: &[0],
        shard: None,
    };
    // Every destination is refused, not only the one whose grid is cut.
    let targets = [
        Target::W13,
        Target::W2,
        Target::W13Companion("weight_scale"),
        Target::W2Companion("weight_scale"),
    ];
    let errors: Vec<String> = targets
        .iter()
        .map(|&t| {
            CopyPlan::new(&ckpt, &layer, t, &request)
                .unwrap_err()
                .to_string()
        })
        .collect();
    assert!(errors.iter().all(|e| *e == errors[0]), "{errors:?}");
    assert_eq!(layer.check_tp_split(tp_size).unwrap_err(), {
        let full = &errors[0];
        full[full.find("tp_size=").unwrap()..].to_string()
    });
    errors[0].clone()
}

#[test]
fn a_split_that_cuts_a_pack_or_a_scale_group_is_refused_with_the_sizes_that_fit() {
    // NVFP4, I = 128: tp=16 gives 8 values a rank, half of a 16-value scale group.
    let err = split_error(&per_expert(&NVFP4), Some(NVFP4_CONFIG), 16);
    assert!(
        err.contains("tp_size=16 gives each rank 8 of the intermediate size 128"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "16-value blocks (scales or packs) of `{PREFIX}.0.gate_proj.weight_scale`"
        )),
        "{err}"
    );
    assert!(err.ends_with("tp_size that fit: 1, 2, 4, 8"), "{err}");

    // int4 of 32-value groups: tp=8 gives 16 values, half a group.
    let err = split_error(&int4_files(32, false), Some(&int4_config(32, true)), 8);
    assert!(err.contains("32-value blocks (scales or packs)"), "{err}");
    assert!(err.ends_with("tp_size that fit: 1, 2, 4"), "{err}");

    // int4 of 4-value groups: tp=32 gives 4 values, whole groups but half of an int32 of
    // eight packed values in down's rows.
    let err = split_error(&int4_files(4, false), Some(&int4_config(4, true)), 32);
    assert!(
        err.contains(&format!(
            "8-value blocks (scales or packs) of `{PREFIX}.0.gate_proj.weight_packed`"
        )),
        "{err}"
    );
    assert!(err.ends_with("tp_size that fit: 1, 2, 4, 8, 16"), "{err}");

    // The same with zero points: half of an int32 of eight rows' zero points.
    let err = split_error(&int4_files(4, true), Some(&int4_config(4, false)), 32);
    assert!(
        err.contains(&format!(
            "8-value blocks (scales or packs) of `{PREFIX}.0.gate_proj.weight_zero_point`"
        )),
        "{err}"
    );
    assert!(err.ends_with("tp_size that fit: 1, 2, 4, 8, 16"), "{err}");
}

#[test]
fn zero_points_that_do_not_fit_the_packed_grid_are_named() {
    let config = int4_config(32, false);
    let mut unpacked = int4_files(32, true);
    let name = format!("{PREFIX}.1.down_proj.weight_zero_point");
    let zp = unpacked.iter_mut().find(|t| t.name == name).unwrap();
    zp.shape = vec![HIDDEN, INTER / 32]; // one int32 a row
    zp.data = vec![0; HIDDEN * INTER / 32 * 4];
    let (_dir, ckpt) = open(&unpacked, Some(&config));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "`{name}` is I32 [256, 4]; the zero points of a [256, 128] weight are I32 [32, 4]"
        )),
        "{err}"
    );

    let mut as_float = int4_files(32, true);
    for t in as_float
        .iter_mut()
        .filter(|t| t.name.ends_with(".weight_zero_point"))
    {
        t.dtype = Dtype::F32;
    }
    let (_dir, ckpt) = open(&as_float, Some(&config));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(err.contains("weight_zero_point` is F32 [16, 8]"), "{err}");

    // Asymmetric weights without their zero points, and zero points beside symmetric ones.
    let (_dir, ckpt) = open(&int4_files(32, false), Some(&config));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(err.contains("declares asymmetric integer weights"), "{err}");
    let (_dir, ckpt) = open(&int4_files(32, true), Some(&int4_config(32, true)));
    let err = detect(&ckpt, None).unwrap_err().to_string();
    assert!(err.contains("declares symmetric integer weights"), "{err}");
}
