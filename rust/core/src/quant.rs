//! Quantized experts: what `quantization_config` declares, and the companion tensors (scales)
//! that ride with each expert weight.
//!
//! A companion maps onto its weight's rows and columns by a [`Grid`]: one value per block of
//! entries, one per row, or one for the whole matrix. Copy plans slice a companion together
//! with its weight through that grid, so that a TP rank or an EP rank reads only the scales
//! of the weights it keeps.

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::shard::TensorEntry;

/// The block of weight entries one block scale covers when neither `config.json` nor the
/// file says otherwise: every block-scaled fp8 release (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8,
/// MiniMax-M2) uses 128 × 128.
pub const DEFAULT_BLOCK: (usize, usize) = (128, 128);

/// Values of an mxfp4 block (the OCP MX block size), which one e8m0 scale covers.
pub const MX_BLOCK: usize = 32;

/// How the values of a companion map onto the entries of its `rows × cols` weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// One value per `rows × cols` block (fp8 `weight_scale_inv`, `[ceil(out/128), ceil(in/128)]`;
    /// compressed-tensors' int4 zero points, `[out/8, in/group]`, eight rows' points an int32).
    Block { rows: usize, cols: usize },
    /// One value per weight row (per-channel `weight_scale [out, 1]`).
    Row,
    /// One value for the whole matrix (per-tensor `weight_scale`, `input_scale`).
    Tensor,
    /// `n` values that describe the whole matrix (compressed-tensors' `weight_shape [2]`).
    Whole(usize),
}

impl Grid {
    /// The companion's `(rows, cols)` for a `rows × cols` weight.
    pub fn shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match *self {
            Grid::Block { rows: bn, cols: bk } => (rows.div_ceil(bn), cols.div_ceil(bk)),
            Grid::Row => (rows, 1),
            Grid::Tensor => (1, 1),
            Grid::Whole(n) => (1, n),
        }
    }

    /// Weight entries one value spans along the weight's rows (`along_rows`) or columns;
    /// `None` where one value spans the whole dimension, so that every TP rank keeps it.
    pub fn step(&self, along_rows: bool) -> Option<usize> {
        match (*self, along_rows) {
            (Grid::Block { rows, .. }, true) => Some(rows),
            (Grid::Block { cols, .. }, false) => Some(cols),
            (Grid::Row, true) => Some(1),
            (Grid::Row, false) | (Grid::Tensor | Grid::Whole(_), _) => None,
        }
    }

    /// `block`, `group` (a block of one row), `channel` or `tensor`: the names
    /// compressed-tensors gives these strategies.
    pub fn scheme(&self) -> &'static str {
        match self {
            Grid::Block { rows: 1, .. } => "group",
            Grid::Block { .. } => "block",
            Grid::Row => "channel",
            Grid::Tensor => "tensor",
            Grid::Whole(_) => "whole",
        }
    }

    /// The grid a companion of `shape` has over a `rows × cols` weight, if any. `block` is
    /// the block size the checkpoint declares; `scheme`, where the config names one, decides
    /// between grids that give the same shape (a 128 × 128 weight has one block scale).
    pub fn of_shape(
        shape: &[usize],
        rows: usize,
        cols: usize,
        block: (usize, usize),
        scheme: Option<&str>,
    ) -> Option<Grid> {
        let block = Grid::Block {
            rows: block.0,
            cols: block.1,
        };
        let as_matrix = match shape {
            [] => (1, 1),
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => return None,
        };
        let fits =
            |g: &Grid| g.shape(rows, cols) == as_matrix && (*g != Grid::Row || shape.len() == 2);
        let grids = [Grid::Tensor, Grid::Row, block];
        grids
            .iter()
            .find(|g| Some(g.scheme()) == scheme && fits(g))
            .or_else(|| grids.iter().find(|g| fits(g)))
            .copied()
    }
}

/// A kind of companion tensor, by the name it has in checkpoints (the suffix after a
/// per-expert weight's module, `….gate_proj.weight_scale_inv`) and in vLLM (`w13_{kind}`).
#[derive(Debug, PartialEq, Eq)]
pub struct CompanionKind {
    pub name: &'static str,
    /// The suffix of the fused form transformers v5 writes after `gate_up_proj`/`down_proj`.
    pub fused_suffix: Option<&'static str>,
    /// The weight's own scale (as opposed to an activation scale): required by fp8 weights.
    pub weight_scale: bool,
    /// vLLM keeps one value per expert for gate and up together (`w13_input_scale [E]`):
    /// both projections read the same activations. It keeps the up projection's, the last
    /// of the two its loader sees in name order.
    pub merged_w13: bool,
}

pub const COMPANION_KINDS: [CompanionKind; 6] = [
    CompanionKind {
        name: "weight_scale_inv",
        fused_suffix: Some("_scale_inv"),
        weight_scale: true,
        merged_w13: false,
    },
    CompanionKind {
        name: "weight_scale",
        fused_suffix: None,
        weight_scale: true,
        merged_w13: false,
    },
    CompanionKind {
        name: "input_scale",
        fused_suffix: Some("_activation_scale"),
        weight_scale: false,
        merged_w13: true,
    },
    // NVFP4's global (per-tensor) scale beside its 16-value block scales `weight_scale`.
    CompanionKind {
        name: "weight_scale_2",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
    },
    // compressed-tensors' `[rows, cols]` of a packed weight, as int32; vLLM keeps one per
    // expert for gate and up (`w13_weight_shape [E, 2]`, the up projection's).
    CompanionKind {
        name: "weight_shape",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: true,
    },
    // compressed-tensors' zero points of asymmetric integer weights: int32s of `32 / bits`
    // rows' points each, one per group of columns (a `Grid::Block`, see `zero_point_grid`).
    CompanionKind {
        name: "weight_zero_point",
        fused_suffix: None,
        weight_scale: false,
        merged_w13: false,
    },
];

pub fn companion_kind(name: &str) -> Option<&'static CompanionKind> {
    COMPANION_KINDS.iter().find(|k| k.name == name)
}

/// Dtypes a scale may be stored in: converted exactly to vLLM's float32 parameters, or kept
/// (NVFP4's float8 e4m3 block scales, which vLLM keeps as they are).
pub const SCALE_DTYPES: [Dtype; 5] = [
    Dtype::F32,
    Dtype::BF16,
    Dtype::F16,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3,
];

/// Values one stored weight element holds along the input dimension, by what the group is:
/// 1 for float weights, 2 for NVFP4 (two e2m1 values a byte, recognised by its
/// `weight_scale_2` beside `uint8` weights), `32 / bits` for compressed-tensors'
/// `weight_packed` int32 (`int_bits`: the bits of its values, where the group's weights are
/// so named); `None` for integer weights of a scheme the loader does not know.
pub fn packing(weight: Dtype, has_weight_scale_2: bool, int_bits: Option<usize>) -> Option<usize> {
    match (weight, int_bits) {
        (d, _) if is_float(d) => Some(1),
        (Dtype::U8, _) if has_weight_scale_2 => Some(2),
        (Dtype::I32, Some(bits)) if bits > 0 && 32 % bits == 0 && bits < 32 => Some(32 / bits),
        _ => None,
    }
}

/// Weight dtypes that need a weight scale to mean anything.
pub fn is_quantized_weight(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ
    )
}

/// Floating-point dtypes: what a weight is unless it packs quantized values into integers.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
        || is_quantized_weight(dtype)
}

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
    /// the fp8 schemes it loads.
    pub fn unsupported(config: Option<&Value>) -> Option<String> {
        let q = quantization_config(config?)?;
        let method = q.get("quant_method")?.as_str()?;
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        match method {
            "fp8" | "fbgemm_fp8" | "mxfp4" => None,
            "modelopt" => {
                let algo = text(
                    q.get("quant_algo")
                        .or_else(|| q.get("quantization")?.get("quant_algo")),
                );
                match algo.as_deref() {
                    Some("FP8" | "NVFP4") => None,
                    Some(algo) => Some(format!("modelopt {algo}")),
                    None => Some("modelopt without quant_algo".into()),
                }
            }
            "compressed-tensors" => {
                let weights: Vec<&Value> = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|groups| groups.values())
                    .filter_map(|g| g.get("weights"))
                    .collect();
                // Zero points are loaded where they are packed per group of columns.
                let packed = |w: &&&Value| {
                    q.get("format").and_then(Value::as_str) == Some("pack-quantized")
                        && w.get("type").and_then(Value::as_str) == Some("int")
                        && match w.get("symmetric").and_then(Value::as_bool) {
                            Some(true) => true,
                            Some(false) => {
                                w.get("strategy").and_then(Value::as_str) == Some("group")
                            }
                            None => false,
                        }
                };
                let other = weights.iter().find(|w| {
                    w.get("type").and_then(Value::as_str) != Some("float") && !packed(w)
                })?;
                let bits = other.get("num_bits").and_then(Value::as_u64);
                let kind = text(other.get("type")).unwrap_or_else(|| "untyped".into());
                let format = text(q.get("format")).unwrap_or_else(|| "unnamed format".into());
                Some(match bits {
                    Some(bits) => format!("compressed-tensors {kind}{bits} {format}"),
                    None => format!("compressed-tensors {kind} {format}"),
                })
            }
            other => Some(other.to_string()),
        }
    }

    pub fn from_config(config: Option<&Value>) -> Option<QuantConfig> {
        let q = quantization_config(config?)?;
        let method = q.get("quant_method")?.as_str()?.to_string();
        let pair = |v: &Value| -> Option<(usize, usize)> {
            match v.as_array()?.as_slice() {
                [r, c] => Some((r.as_u64()? as usize, c.as_u64()? as usize)),
                _ => None,
            }
        };
        let (mut int_bits, mut symmetric) = (None, None);
        let (block, scheme) = match method.as_str() {
            "fp8" => match q.get("weight_block_size").and_then(pair) {
                Some(block) => (Some(block), Some("block")),
                None => (None, Some("tensor")),
            },
            "fbgemm_fp8" => (None, Some("channel")),
            // gpt-oss: one e8m0 scale per 32 values of a row.
            "mxfp4" => (Some((1, MX_BLOCK)), Some("group")),
            "compressed-tensors" => {
                // The weights of the first float or int group; experts are `Linear` targets.
                let weights = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|groups| groups.values())
                    .filter_map(|g| g.get("weights"))
                    .find(|w| {
                        matches!(w.get("type").and_then(Value::as_str), Some("float" | "int"))
                    });
                let field = |k: &str| weights.and_then(|w| w.get(k));
                if field("type").and_then(Value::as_str) == Some("int") {
                    int_bits = field("num_bits")
                        .and_then(Value::as_u64)
                        .map(|b| b as usize);
                    symmetric = field("symmetric").and_then(Value::as_bool);
                }
                let group = field("group_size").and_then(Value::as_u64);
                match field("strategy").and_then(Value::as_str) {
                    Some("block") => (field("block_structure").and_then(pair), Some("block")),
                    Some("group") => (group.map(|g| (1, g as usize)), Some("group")),
                    Some("channel") => (None, Some("channel")),
                    Some("tensor") => (None, Some("tensor")),
                    _ => (None, None),
                }
            }
            "modelopt" => {
                let field = |k: &str| q.get(k).or_else(|| q.get("quantization")?.get(k));
                match field("quant_algo").and_then(Value::as_str) {
                    Some("FP8") => (None, Some("tensor")),
                    Some("NVFP4") => {
                        let group = field("group_size").and_then(Value::as_u64).unwrap_or(16);
                        (Some((1, group as usize)), Some("group"))
                    }
                    _ => (None, None),
                }
            }
            _ => (None, None),
        };
        Some(QuantConfig {
            method,
            block,
            scheme,
            int_bits,
            symmetric,
        })
    }
}

/// `quantization_config` of `config.json`, also where it sits under `text_config`.
fn quantization_config(config: &Value) -> Option<&Value> {
    config
        .get("quantization_config")
        .or_else(|| config.get("text_config")?.get("quantization_config"))
}

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

/// One stored tensor: its name and entry.
pub(crate) type Found<'c> = (&'c str, &'c TensorEntry);

/// Companions of a per-expert group as found by name: `kind -> [expert][gate, up, down]`.
pub(crate) type PerExpertFound<'c> = BTreeMap<&'static str, Vec<[Option<Found<'c>>; 3]>>;

fn layout_error(ckpt: &Checkpoint, prefix: &str, reason: String) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        prefix: prefix.to_string(),
        reason,
    }
}

/// What a group's weights look like, for matching companions against them.
pub(crate) struct Weights<'a> {
    pub prefix: &'a str,
    pub hidden: usize,
    pub inter: usize,
    pub dtype: Dtype,
    /// Values per stored element along the input dimension (see [`packing`]).
    pub pack: usize,
    /// mxfp4 blocks: one e8m0 scale, stored as a uint8 byte, per 32 values of a row.
    pub mx: bool,
}

impl Weights<'_> {
    /// `(rows, cols)` of gate/up (`slot` 0, 1) or down (`slot` 2).
    fn dims(&self, slot: usize) -> (usize, usize) {
        if slot < 2 {
            (self.inter, self.hidden)
        } else {
            (self.hidden, self.inter)
        }
    }
}

/// The grid of companion `name` of shape `shape` over a `rows × cols` weight, or an error
/// that says which shapes would fit.
fn grid_of(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<&QuantConfig>,
    name: &str,
    shape: &[usize],
    (rows, cols): (usize, usize),
) -> Result<Grid> {
    // mxfp4 and NVFP4 scale a group of 32 and 16 values of a row, whether or not config.json
    // says so.
    let default = match (w.mx, w.pack) {
        (true, _) => (1, MX_BLOCK),
        (false, 2) => (1, 16),
        _ => DEFAULT_BLOCK,
    };
    let block = config.and_then(|c| c.block).unwrap_or(default);
    let scheme = config.and_then(|c| c.scheme);
    let blocks = Grid::Block {
        rows: block.0,
        cols: block.1,
    };
    let grid = Grid::of_shape(shape, rows, cols, block, scheme);
    // mxfp4 has one scale per 32 values of a row, and no other grid.
    let grid = grid.filter(|g| !w.mx || *g == blocks);
    grid.ok_or_else(|| {
        let (br, bc) = blocks.shape(rows, cols);
        let others = if w.mx {
            ""
        } else {
            &format!(", [{rows}, 1] (one per row) or a scalar (one per tensor)")
        };
        layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` has shape {shape:?}, which is no scale grid of its [{rows}, {cols}] \
                 weight: expected [{br}, {bc}] ({}×{} blocks){others}",
                block.0, block.1
            ),
        )
    })
}

/// The grid of compressed-tensors' zero points `name` over a `rows × cols` packed integer
/// weight. `pack_to_int32(zero_point, bits, packed_dim=0)` packs `32 / bits` points of
/// consecutive rows into each int32, one per group of columns: `[rows/pack, cols/group]`, so
/// that one stored value spans `pack` rows and `group` columns, and a TP split of the rows
/// must fall on whole packs (vLLM's `w13_weight_zero_point [E, 2·I/tp/pack, H/group]`).
fn zero_point_grid(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<&QuantConfig>,
    name: &str,
    entry: &TensorEntry,
    (rows, cols): (usize, usize),
) -> Result<Grid> {
    let group = config
        .filter(|c| c.scheme == Some("group"))
        .and_then(|c| c.block)
        .map(|(_, group)| group)
        .filter(|_| w.pack > 1)
        .ok_or_else(|| {
            layout_error(
                ckpt,
                w.prefix,
                format!(
                    "`{name}`: zero points are loaded beside packed integer weights with group \
                     scales (compressed-tensors `pack-quantized`, `strategy: group`) only"
                ),
            )
        })?;
    let grid = Grid::Block {
        rows: w.pack,
        cols: group,
    };
    let (r, c) = grid.shape(rows, cols);
    if entry.dtype != Dtype::I32 || entry.shape != [r, c] {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` is {} {:?}; the zero points of a [{rows}, {cols}] weight are I32 \
                 [{r}, {c}] ({} rows packed in each int32, one per {group}-value group)",
                entry.dtype, entry.shape, w.pack
            ),
        ));
    }
    Ok(grid)
}

/// A `weight_shape` must record the `[rows, cols]` (in values) of the weight it rides with:
/// a packed weight's own shape counts stored elements, so this is what says how many values
/// it holds.
fn check_weight_shape(
    ckpt: &Checkpoint,
    w: &Weights,
    name: &str,
    entry: &TensorEntry,
    (rows, cols): (usize, usize),
) -> Result<()> {
    let (shard, _) = ckpt.tensor(name)?;
    let mut bytes = vec![0u8; entry.end - entry.start];
    ckpt.shards()[shard].read_at(entry.start, &mut bytes)?;
    let width = bytes.len() / 2;
    let recorded: Vec<i64> = bytes
        .chunks_exact(width)
        .map(|b| match *b {
            [a, b, c, d] => i64::from(i32::from_le_bytes([a, b, c, d])),
            _ => i64::from_le_bytes(b.try_into().expect("8 bytes of an I64")),
        })
        .collect();
    let expected = [rows as i64, cols as i64];
    if recorded != expected {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!(
                "`{name}` records the weight as {recorded:?}, but its weight holds {expected:?} \
                 values"
            ),
        ));
    }
    Ok(())
}

/// The quantization of a per-expert group from the companions found beside its weights.
pub(crate) fn per_expert(
    ckpt: &Checkpoint,
    w: &Weights,
    modules: [&str; 3],
    found: PerExpertFound,
) -> Result<Option<Quantization>> {
    let config = QuantConfig::from_config(ckpt.config());
    let mut companions = Vec::new();
    for (kind, experts) in found {
        let kind = companion_kind(kind).expect("only known kinds are collected");
        let mut names: [Vec<String>; 3] = Default::default();
        let mut grid = None;
        let mut dtypes = Vec::new();
        for (e, slots) in experts.iter().enumerate() {
            for (slot, tensor) in slots.iter().enumerate() {
                let Some((name, entry)) = tensor else {
                    return Err(layout_error(
                        ckpt,
                        w.prefix,
                        format!(
                            "`{}.{e}.{}.{}` is missing (other experts have one)",
                            w.prefix, modules[slot], kind.name
                        ),
                    ));
                };
                let dims = w.dims(slot);
                let this = if kind.name == "weight_shape" {
                    // compressed-tensors writes `torch.tensor(weight.shape)`: int64 today.
                    if entry.shape != [2] || !matches!(entry.dtype, Dtype::I32 | Dtype::I64) {
                        return Err(layout_error(
                            ckpt,
                            w.prefix,
                            format!(
                                "`{name}` is {} {:?}; a weight_shape is I64 or I32 [2]",
                                entry.dtype, entry.shape
                            ),
                        ));
                    }
                    check_weight_shape(ckpt, w, name, entry, dims)?;
                    Grid::Whole(2)
                } else if kind.name == "weight_zero_point" {
                    zero_point_grid(ckpt, w, config.as_ref(), name, entry, dims)?
                } else {
                    grid_of(ckpt, w, config.as_ref(), name, &entry.shape, dims)?
                };
                if kind.name == "input_scale" && this != Grid::Tensor {
                    return Err(layout_error(
                        ckpt,
                        w.prefix,
                        format!(
                            "`{name}` has shape {:?}; an input scale is a scalar",
                            entry.shape
                        ),
                    ));
                }
                match grid {
                    None => grid = Some(this),
                    Some(g) if g != this => {
                        return Err(layout_error(
                            ckpt,
                            w.prefix,
                            format!(
                                "`{name}` has {} scales, other `{}` tensors of the group {} scales",
                                this.scheme(),
                                kind.name,
                                g.scheme()
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                dtypes.push((*name, entry.dtype));
                names[slot].push(name.to_string());
            }
        }
        companions.push(Companion {
            kind,
            // vLLM's NVFP4 method keeps gate's and up's input scales (`[E, 2]`).
            merged_w13: kind.merged_w13 && !(kind.name == "input_scale" && w.pack == 2),
            grid: grid.unwrap_or(Grid::Tensor),
            dtype: one_dtype(ckpt, w, &dtypes, kind)?,
            tensors: CompanionTensors::PerExpert(names),
        });
    }
    finish(ckpt, w, config, companions)
}

/// The quantization of a fused group: the companions transformers v5 writes beside its
/// `gate_up`/`down` tensors (`gate_up_proj_scale_inv [E, 2·ceil(I/128), ceil(H/128)]`, ...),
/// and `mx_scales`, the names of mxfp4 weights' scales (gpt-oss' `gate_up_proj_scales
/// [E, 2I, H/32]`, `down_proj_scales`), where the group is mxfp4. Scales of transposed
/// tensors are refused, and so are those of interleaved ones unless they are per row.
pub(crate) fn fused(
    ckpt: &Checkpoint,
    w: &Weights,
    (gate_up, down): (&str, &str),
    mx_scales: Option<(String, String)>,
    num_experts: usize,
    (transposed, interleaved): (bool, bool),
) -> Result<Option<Quantization>> {
    let config = QuantConfig::from_config(ckpt.config());
    let weight_scale = companion_kind("weight_scale").expect("a known kind");
    let candidates = COMPANION_KINDS
        .iter()
        .filter_map(|kind| {
            let suffix = kind.fused_suffix?;
            Some((
                kind,
                (format!("{gate_up}{suffix}"), format!("{down}{suffix}")),
            ))
        })
        .chain(mx_scales.map(|names| (weight_scale, names)));
    let mut companions = Vec::new();
    for (kind, names) in candidates {
        let (g, d) = match (ckpt.tensor(&names.0), ckpt.tensor(&names.1)) {
            (Err(_), Err(_)) => continue,
            (Ok((_, g)), Ok((_, d))) => (g, d),
            _ => {
                return Err(layout_error(
                    ckpt,
                    w.prefix,
                    format!("only one of `{}` and `{}` is present", names.0, names.1),
                ))
            }
        };
        let unsupported = || {
            layout_error(
                ckpt,
                w.prefix,
                format!(
                    "`{}`: scales of transposed fused experts, or block scales of interleaved \
                     ones, are not supported",
                    names.0
                ),
            )
        };
        if transposed {
            return Err(unsupported());
        }
        let bad = |name: &str, shape: &[usize], expected: String| {
            layout_error(
                ckpt,
                w.prefix,
                format!("`{name}` has shape {shape:?}; expected {expected}"),
            )
        };
        let grid = if kind.merged_w13 {
            for (name, entry) in [(&names.0, g), (&names.1, d)] {
                if entry.shape != [num_experts] {
                    return Err(bad(name, &entry.shape, format!("[{num_experts}]")));
                }
            }
            Grid::Tensor
        } else {
            if d.shape.len() != 3 || d.shape[0] != num_experts {
                return Err(bad(
                    &names.1,
                    &d.shape,
                    format!("[{num_experts}, rows, cols]"),
                ));
            }
            let grid = grid_of(ckpt, w, config.as_ref(), &names.1, &d.shape[1..], w.dims(2))?;
            let (r, c) = grid.shape(w.inter, w.hidden);
            if g.shape != [num_experts, 2 * r, c] {
                return Err(bad(
                    &names.0,
                    &g.shape,
                    format!(
                        "[{num_experts}, {}, {c}]: the {} grid of `{}`, for gate and for up",
                        2 * r,
                        grid.scheme(),
                        names.1
                    ),
                ));
            }
            if interleaved && grid.step(true).is_some_and(|rows| rows > 1) {
                return Err(unsupported());
            }
            grid
        };
        companions.push(Companion {
            kind,
            merged_w13: kind.merged_w13,
            grid,
            dtype: one_dtype(ckpt, w, &[(&names.0, g.dtype), (&names.1, d.dtype)], kind)?,
            tensors: CompanionTensors::Fused {
                gate_up: names.0,
                down: names.1,
            },
        });
    }
    finish(ckpt, w, config, companions)
}

fn one_dtype(
    ckpt: &Checkpoint,
    w: &Weights,
    dtypes: &[(&str, Dtype)],
    kind: &CompanionKind,
) -> Result<Dtype> {
    let (first_name, first) = dtypes[0];
    if let Some((name, other)) = dtypes.iter().find(|(_, d)| *d != first) {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!("`{first_name}` is {first} but `{name}` is {other}"),
        ));
    }
    if w.mx && first != Dtype::U8 {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!("`{first_name}` is {first}; mxfp4 scales are e8m0 bytes, U8"),
        ));
    }
    let integer = matches!(kind.name, "weight_shape" | "weight_zero_point");
    if !w.mx && !integer && !SCALE_DTYPES.contains(&first) {
        return Err(layout_error(
            ckpt,
            w.prefix,
            format!("`{first_name}` is {first}; scales are F32, BF16, F16, F8_E8M0 or F8_E4M3"),
        ));
    }
    Ok(first)
}

/// Checks the companions against the weights and the config.
fn finish(
    ckpt: &Checkpoint,
    w: &Weights,
    config: Option<QuantConfig>,
    companions: Vec<Companion>,
) -> Result<Option<Quantization>> {
    let err = |reason: String| layout_error(ckpt, w.prefix, reason);
    let weight_scales: Vec<&Companion> =
        companions.iter().filter(|c| c.kind.weight_scale).collect();
    let quantized = is_quantized_weight(w.dtype) || w.pack > 1;
    if companions.is_empty() {
        return if quantized {
            Err(err(format!(
                "the experts' weights are {} but have no scales beside them (`weight_scale_inv` \
                 or `weight_scale`); without them the values mean nothing",
                w.dtype
            )))
        } else {
            Ok(None)
        };
    }
    let first = companions[0].tensor_names()[0];
    if !quantized {
        return Err(err(format!(
            "the experts have scales (`{first}`) but their weights are {}, not float8 or packed \
             fp4",
            w.dtype
        )));
    }
    let scale = match weight_scales.as_slice() {
        [one] => *one,
        [] => return Err(err(format!("`{first}` has no weight scale beside it"))),
        [a, b, ..] => {
            return Err(err(format!(
                "both `{}` and `{}` are present: one weight scale per weight",
                a.tensor_names()[0],
                b.tensor_names()[0]
            )))
        }
    };
    if let Some(QuantConfig {
        method,
        scheme: Some(scheme),
        ..
    }) = &config
    {
        if scale.grid.scheme() != *scheme {
            return Err(err(format!(
                "config.json declares {method} with {scheme} scales, but `{}` holds {} scales",
                scale.tensor_names()[0],
                scale.grid.scheme()
            )));
        }
    }
    if let Some(QuantConfig {
        symmetric: Some(symmetric),
        ..
    }) = &config
    {
        match (
            symmetric,
            companions
                .iter()
                .find(|c| c.kind.name == "weight_zero_point"),
        ) {
            (false, None) => {
                return Err(err(
                    "config.json declares asymmetric integer weights (`symmetric: false`), but \
                     they have no `weight_zero_point` beside them: the checkpoint lacks its \
                     zero points, or config.json misstates `symmetric`"
                        .into(),
                ))
            }
            (true, Some(zp)) => {
                return Err(err(format!(
                    "`{}` holds zero points, but config.json declares symmetric integer weights",
                    zp.tensor_names()[0]
                )))
            }
            _ => {}
        }
    }
    Ok(Some(Quantization {
        method: config.map_or_else(
            || {
                match (w.mx, w.pack) {
                    (true, _) => "mxfp4",
                    (false, 1) => "fp8",
                    (false, 2) => "modelopt",
                    _ => "compressed-tensors",
                }
                .to_string()
            },
            |c| c.method,
        ),
        companions,
    }))
}
