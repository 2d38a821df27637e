//! Finding routed-expert groups in a checkpoint and describing each expert's matrices as
//! strided views of the stored tensors.
//!
//! The layout is read from names and from the shapes of *both* the gate/up and the down
//! tensor, never from one tensor alone: a square `[E, H, H]` tensor says nothing about its
//! orientation, but `gate_up [E, 2I, H]` beside `down [E, H, I]` does.

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::quant::{
    self, CompanionTensors, Found, Grid, Packing, PerExpertFound, Quantization, Weights, MX_BLOCK,
};
use crate::shard::{elem_bytes, TensorEntry};

/// One matrix of one expert. Gate and up are `[I, H]`, down is `[H, I]`; biases are a
/// single row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// Fused gate/up + down tensors (transformers v5, gpt-oss, Llama 4, GraniteMoe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedTensors {
    pub gate_up: String,
    pub down: String,
    pub gate_up_bias: Option<String>,
    pub down_bias: Option<String>,
    /// `gate_up [E, H, 2I]` and `down [E, I, H]` instead of `[E, 2I, H]` and `[E, H, I]`.
    pub transposed: bool,
    /// gate = even, up = odd entries of the 2I axis (gpt-oss) instead of two halves.
    pub interleaved: bool,
}

/// One 2-D tensor per expert and matrix (Mixtral, Qwen MoE, DeepSeek, Grok, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerExpertTensors {
    pub naming: &'static Naming,
    /// `tensors[part][expert]`, parts in [`Part`] order; biases only when the checkpoint has them.
    pub weights: [Vec<String>; 3],
    pub biases: Option<[Vec<String>; 3]>,
}

/// Each matrix of all experts stacked in one 2-D tensor `[E·I, H]`, expert after expert
/// (DBRX's `ffn.experts.mlp.w1 / v1 / w2`): gate and up as `[I, H]` per expert, down
/// transposed, `[I, H]` per expert for its `[H, I]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackedTensors {
    pub gate: String,
    pub up: String,
    pub down: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertTensors {
    Fused(FusedTensors),
    PerExpert(PerExpertTensors),
    Stacked(StackedTensors),
}

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

/// Names of a fused gate/up tensor, its down companion, and their biases where the family
/// has them, as suffixes of the experts prefix.
struct FusedNames {
    gate_up: &'static str,
    down: &'static str,
    biases: Option<(&'static str, &'static str)>,
    /// For mxfp4 weights (gpt-oss): the names of their e8m0 scales. Such weights are stored
    /// as `[E, rows, cols/32, 16]` uint8, blocks of 32 e2m1 values two a byte, and their scales
    /// as `[E, rows, cols/32]` uint8, one per block.
    mx_scales: Option<(&'static str, &'static str)>,
}

const FUSED_NAMES: [FusedNames; 3] = [
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
const STACKED_NAMES: [[&str; 3]; 1] = [["mlp.w1", "mlp.v1", "mlp.w2"]];

/// `config.json` keys (dotted paths) that give the number of routed experts, which the
/// shape of a stacked tensor `[E·I, H]` does not tell.
const NUM_EXPERTS_KEYS: [&str; 4] = [
    "ffn_config.moe_num_experts",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
];

/// `model_type`s whose fused gate/up tensor interleaves gate and up.
const INTERLEAVED_MODEL_TYPES: [&str; 1] = ["gpt_oss"];

/// The shard metadata entry in which a writer records how gate and up are arranged in its
/// fused tensors (`concatenated` or `interleaved`): what the files say beats what
/// `config.json`'s `model_type` implies (a gpt-oss checkpoint rewritten with gate and up
/// concatenated is still `gpt_oss`).
pub const GATE_UP_METADATA_KEY: &str = "fastmoe_load.gate_up";

/// A 2-D strided view into one stored tensor, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixView {
    pub tensor: String,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatrixView {
    pub fn select_rows(mut self, first: usize, count: usize) -> Self {
        self.offset += first * self.row_stride;
        self.rows = count;
        self
    }

    pub fn select_cols(mut self, first: usize, count: usize) -> Self {
        self.offset += first * self.col_stride;
        self.cols = count;
        self
    }

    /// A gate view of an interleaved gate/up tensor widened to its up entries too: twice the
    /// rows (or, for a bias, the columns), gate's and up's in turn, read in file order.
    pub fn pairs(self, along_rows: bool) -> Self {
        if along_rows {
            MatrixView {
                rows: 2 * self.rows,
                row_stride: self.row_stride / 2,
                ..self
            }
        } else {
            MatrixView {
                cols: 2 * self.cols,
                col_stride: self.col_stride / 2,
                ..self
            }
        }
    }

    /// The same entries in the order of the transposed tensor that stores them; with
    /// `with_pairs`, each row also takes the interleaved neighbour of every entry (gate and
    /// up pairs of an interleaved `gate_up`), so that it is one contiguous run.
    pub fn stored(self, with_pairs: bool) -> Self {
        let (cols, col_stride) = if with_pairs {
            (self.rows * self.row_stride, 1)
        } else {
            (self.rows, self.row_stride)
        };
        MatrixView {
            rows: self.cols,
            row_stride: self.col_stride,
            cols,
            col_stride,
            ..self
        }
    }
}

/// One routed-expert group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeLayer {
    pub prefix: String,
    pub num_experts: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub dtype: Dtype,
    pub bias_dtype: Option<Dtype>,
    /// Values one stored weight element holds along the input dimension: 1, or 2 for NVFP4
    /// (two e2m1 values a byte). `hidden_size` and `intermediate_size` count values; the
    /// views of [`MoeLayer::matrix`] count stored elements (`[I, H/pack]`, `[H, I/pack]`).
    pub pack: usize,
    pub tensors: ExpertTensors,
    /// Scales beside quantized (fp8) weights; `None` for unquantized experts.
    pub quantization: Option<Quantization>,
}

impl MoeLayer {
    /// `fused`, `fused_transposed`, `fused_interleaved`, `fused_transposed_interleaved`,
    /// `per_expert` or `stacked`.
    pub fn format(&self) -> &'static str {
        match &self.tensors {
            ExpertTensors::PerExpert(_) => "per_expert",
            ExpertTensors::Stacked(_) => "stacked",
            ExpertTensors::Fused(f) => match (f.transposed, f.interleaved) {
                (false, false) => "fused",
                (true, false) => "fused_transposed",
                (false, true) => "fused_interleaved",
                (true, true) => "fused_transposed_interleaved",
            },
        }
    }

    pub fn has_bias(&self) -> bool {
        self.bias_dtype.is_some()
    }

    /// Every tensor of the group, weights first, then biases, then companions.
    pub fn tensor_names(&self) -> Vec<&str> {
        let companions = self.quantization.iter().flat_map(|q| &q.companions);
        let mut names: Vec<&str> = match &self.tensors {
            ExpertTensors::Fused(f) => [
                Some(&f.gate_up),
                Some(&f.down),
                f.gate_up_bias.as_ref(),
                f.down_bias.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect(),
            ExpertTensors::PerExpert(p) => p
                .weights
                .iter()
                .chain(p.biases.iter().flatten())
                .flatten()
                .map(String::as_str)
                .collect(),
            ExpertTensors::Stacked(t) => vec![&t.gate, &t.up, &t.down],
        };
        names.extend(companions.flat_map(|c| c.tensor_names()));
        names
    }

    /// Where the `kind` companion of `part` (gate, up or down) of `expert` lies, on its grid
    /// over the matrix: `[ceil(rows/bn), ceil(cols/bk)]` block scales, `[rows, 1]` per row,
    /// `[1, 1]` per tensor. `None` for an unknown kind, a bias part or an expert out of range.
    pub fn companion_matrix(&self, kind: &str, part: Part, expert: usize) -> Option<MatrixView> {
        let companion = self.quantization.as_ref()?.companion(kind)?;
        if expert >= self.num_experts {
            return None;
        }
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (slot, (rows, cols)) = match part {
            Part::Gate => (0, companion.grid.shape(i, h)),
            Part::Up => (1, companion.grid.shape(i, h)),
            Part::Down => (2, companion.grid.shape(h, i)),
            _ => return None,
        };
        // Gate and up rows alternate in an interleaved gate_up (its scales are per row then).
        let interleaved = matches!(&self.tensors, ExpertTensors::Fused(f) if f.interleaved);
        let (tensor, offset, row_stride) = match &companion.tensors {
            CompanionTensors::PerExpert(tensors) => (&tensors[slot][expert], 0, cols),
            CompanionTensors::Fused { gate_up, down } => match slot {
                2 => (down, expert * rows * cols, cols),
                _ if companion.merged_w13 => (gate_up, expert, cols),
                _ if interleaved => (gate_up, (expert * 2 * rows + slot) * cols, 2 * cols),
                _ => (gate_up, (expert * 2 * rows + slot * rows) * cols, cols),
            },
        };
        Some(MatrixView {
            tensor: tensor.clone(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        })
    }

    /// The TP shard sizes of the intermediate dimension that fall on every companion's grid
    /// (vLLM's rule: a split never cuts a scale block), as `Err(reason)` for `tp_size`.
    pub fn check_tp_split(&self, tp_size: usize) -> std::result::Result<(), String> {
        let Some(q) = &self.quantization else {
            return Ok(());
        };
        let inter = self.intermediate_size;
        // Gate/up are split along their rows, down along its columns: both in I.
        let steps: Vec<(usize, &str)> = q
            .companions
            .iter()
            .flat_map(|c| {
                let name = c.tensor_names()[0];
                [Grid::step(&c.grid, true), Grid::step(&c.grid, false)]
                    .into_iter()
                    .flatten()
                    .map(move |s| (s, name))
            })
            .collect();
        let weight_name = self.tensor_names()[0].to_string();
        let mut steps = steps;
        if self.pack > 1 {
            steps.push((self.pack, &weight_name));
        }
        let fits = |tp: usize| {
            tp == 1
                || (inter.is_multiple_of(tp)
                    && steps.iter().all(|(s, _)| (inter / tp).is_multiple_of(*s)))
        };
        if fits(tp_size) {
            return Ok(());
        }
        let (step, name) = steps
            .iter()
            .find(|(s, _)| !(inter / tp_size).is_multiple_of(*s))
            .copied()
            .unwrap_or((1, ""));
        let working: Vec<String> = (1..=inter)
            .filter(|&t| fits(t))
            .map(|t| t.to_string())
            .collect();
        Err(format!(
            "tp_size={tp_size} gives each rank {} of the intermediate size {inter}, which cuts the \
             {step}-value blocks (scales or packs) of `{name}`; tp_size that fit: {}",
            inter / tp_size,
            working.join(", ")
        ))
    }

    /// Where `part` of `expert` lies. Gate/up are `[I, H]`, down `[H, I]`, biases `[1, n]`.
    /// `None` for an expert id out of range or a bias of a group without biases.
    pub fn matrix(&self, part: Part, expert: usize) -> Option<MatrixView> {
        if expert >= self.num_experts {
            return None;
        }
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let view = |tensor: &String, offset, rows, cols, row_stride, col_stride| MatrixView {
            tensor: tensor.clone(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        match &self.tensors {
            ExpertTensors::Stacked(t) => {
                let offset = expert * i * h;
                match part {
                    Part::Gate => Some(view(&t.gate, offset, i, h, h, 1)),
                    Part::Up => Some(view(&t.up, offset, i, h, h, 1)),
                    Part::Down => Some(view(&t.down, offset, h, i, 1, h)),
                    Part::GateBias | Part::UpBias | Part::DownBias => None,
                }
            }
            ExpertTensors::PerExpert(p) => {
                let pack = self.pack;
                let (tensors, rows, cols) = match part {
                    Part::Gate => (&p.weights[0], i, h / pack),
                    Part::Up => (&p.weights[1], i, h / pack),
                    Part::Down => (&p.weights[2], h, i / pack),
                    Part::GateBias => (&p.biases.as_ref()?[0], 1, i),
                    Part::UpBias => (&p.biases.as_ref()?[1], 1, i),
                    Part::DownBias => (&p.biases.as_ref()?[2], 1, h),
                };
                Some(view(&tensors[expert], 0, rows, cols, cols, 1))
            }
            ExpertTensors::Fused(f) => {
                // Distance between gate and up along the 2I axis, and the step within each.
                let (up_shift, step) = if f.interleaved { (1, 2) } else { (i, 1) };
                // Stored elements along the input dimension (packed groups are never transposed).
                let (hs, is) = (h / self.pack, i / self.pack);
                Some(match (part, f.transposed) {
                    // gate_up [E, 2I, H]
                    (Part::Gate | Part::Up, false) => {
                        let first = if part == Part::Up { up_shift } else { 0 };
                        view(
                            &f.gate_up,
                            (expert * 2 * i + first) * hs,
                            i,
                            hs,
                            step * hs,
                            1,
                        )
                    }
                    // gate_up [E, H, 2I]
                    (Part::Gate | Part::Up, true) => {
                        let first = if part == Part::Up { up_shift } else { 0 };
                        view(&f.gate_up, expert * h * 2 * i + first, i, h, step, 2 * i)
                    }
                    // down [E, H, I]
                    (Part::Down, false) => view(&f.down, expert * h * is, h, is, is, 1),
                    // down [E, I, H]
                    (Part::Down, true) => view(&f.down, expert * i * h, h, i, 1, h),
                    (Part::GateBias | Part::UpBias, _) => {
                        let first = if part == Part::UpBias { up_shift } else { 0 };
                        let tensor = f.gate_up_bias.as_ref()?;
                        view(tensor, expert * 2 * i + first, 1, i, i * step, step)
                    }
                    (Part::DownBias, _) => view(f.down_bias.as_ref()?, expert * h, 1, h, h, 1),
                })
            }
        }
    }
}

/// Every routed-expert group of the checkpoint, in natural prefix order (layer 2 before 10).
/// `interleaved` overrides the gate/up interleaving of fused tensors, which is otherwise
/// what the shards record ([`GATE_UP_METADATA_KEY`]), else taken from `model_type`, else
/// from the names (mxfp4 `_blocks` exist only in gpt-oss, which interleaves them); an
/// override that contradicts the record is an error.
pub fn detect(ckpt: &Checkpoint, interleaved: Option<bool>) -> Result<Vec<MoeLayer>> {
    let interleaved = gate_up_interleaved(ckpt, interleaved)?;
    let mut layers = Vec::new();
    for (name, gate_up) in ckpt.entries() {
        if let Some(layer) = fused_group(ckpt, name, gate_up, interleaved)? {
            layers.push(layer);
        }
        if let Some(layer) = stacked_group(ckpt, name, gate_up)? {
            layers.push(layer);
        }
    }
    for (prefix, naming, experts) in per_expert_candidates(ckpt) {
        if layers.iter().any(|l| l.prefix == prefix) {
            return Err(layout_error(
                ckpt,
                &prefix,
                "holds both fused and per-expert tensors".into(),
            ));
        }
        layers.push(per_expert_group(ckpt, prefix, naming, experts)?);
    }
    layers.sort_by(|a, b| natural_cmp(&a.prefix, &b.prefix));
    Ok(layers)
}

/// Whether fused gate/up tensors interleave gate and up, where the caller or the files say
/// so or `model_type` implies it; `None` where nothing does (the names decide then).
fn gate_up_interleaved(ckpt: &Checkpoint, requested: Option<bool>) -> Result<Option<bool>> {
    let recorded = match ckpt.recorded(GATE_UP_METADATA_KEY) {
        None => None,
        Some(("concatenated", file)) => Some((false, file)),
        Some(("interleaved", file)) => Some((true, file)),
        Some((other, file)) => {
            return Err(Error::Checkpoint {
                path: file.to_path_buf(),
                reason: format!(
                    "`{GATE_UP_METADATA_KEY}` records gate/up as `{other}`; expected \
                     `concatenated` or `interleaved`"
                ),
            })
        }
    };
    match (requested, recorded) {
        (Some(wanted), Some((found, file))) if wanted != found => Err(Error::Checkpoint {
            path: file.to_path_buf(),
            reason: format!(
                "interleaved={} contradicts the file, which records its fused gate/up \
                 tensors as {}: leave `interleaved` unset",
                if wanted { "True" } else { "False" },
                if found { "interleaved" } else { "concatenated" }
            ),
        }),
        (Some(wanted), _) => Ok(Some(wanted)),
        (None, Some((found, _))) => Ok(Some(found)),
        (None, None) => Ok(ckpt
            .model_type()
            .is_some_and(|t| INTERLEAVED_MODEL_TYPES.contains(&t))
            .then_some(true)),
    }
}

fn layout_error(ckpt: &Checkpoint, prefix: &str, reason: String) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        prefix: prefix.to_string(),
        reason,
    }
}

fn entry<'c>(ckpt: &'c Checkpoint, name: &str) -> Option<&'c TensorEntry> {
    ckpt.tensor(name).ok().map(|(_, e)| e)
}

/// The fused group whose gate/up tensor is `name`, if `name` is one.
fn fused_group(
    ckpt: &Checkpoint,
    name: &str,
    gate_up: &TensorEntry,
    interleaved: Option<bool>,
) -> Result<Option<MoeLayer>> {
    let Some((prefix, names)) = FUSED_NAMES.iter().find_map(|names| {
        let prefix = name.strip_suffix(names.gate_up)?.strip_suffix('.')?;
        Some((prefix, names))
    }) else {
        return Ok(None);
    };
    let mx = names.mx_scales.is_some();
    let interleaved = interleaved.unwrap_or(mx);
    if gate_up.shape.len() != if mx { 4 } else { 3 } {
        return Ok(None); // a dense (non-expert) fused MLP, e.g. Phi-3's `mlp.gate_up_proj.weight`
    }
    let err = |reason: String| layout_error(ckpt, prefix, reason);
    let down_name = format!("{prefix}.{}", names.down);
    let down = entry(ckpt, &down_name)
        .ok_or_else(|| err(format!("`{name}` has no companion `{down_name}`")))?;
    let (g, d) = (&gate_up.shape, &down.shape);
    if d.len() != g.len() || d[0] != g[0] {
        return Err(err(format!(
            "`{name}` {g:?} and `{down_name}` {d:?} do not describe the same experts"
        )));
    }
    if g.contains(&0) || d.contains(&0) {
        // An empty dimension would let the others be anything (their product is still 0).
        return Err(err(format!(
            "`{name}` {g:?} and `{down_name}` {d:?} have an empty dimension"
        )));
    }
    let dtype = same_dtype(ckpt, prefix, &[(name, gate_up), (&down_name, down)])?;
    // Values one stored element holds along the input dimension, and the shapes in values.
    let pack = if mx {
        if dtype != Dtype::U8 || g[3] * 2 != MX_BLOCK || d[3] != g[3] {
            return Err(err(format!(
                "`{name}` {g:?} and `{down_name}` {d:?} are {dtype}; mxfp4 blocks are U8 \
                 [E, rows, cols/{MX_BLOCK}, {}]",
                MX_BLOCK / 2
            )));
        }
        2
    } else {
        1
    };
    let values = |s: &[usize]| [s[0], s[1], s.iter().skip(2).product::<usize>() * pack];
    let (g, d) = (values(g), values(d));
    let twice = |n: usize| n.checked_mul(2);
    let normal = Some(g[1]) == twice(d[2]) && g[2] == d[1];
    // Packing runs along the input dimension, which is last: packed groups are never transposed.
    let transposed = pack == 1 && Some(g[2]) == twice(d[1]) && g[1] == d[2];
    let (hidden, inter) = match (normal, transposed) {
        (true, false) => (g[2], d[2]),
        (false, true) => (g[1], d[1]),
        _ => {
            return Err(err(format!(
                "cannot tell the orientation of `{name}` {:?} and `{down_name}` {:?}: expected \
                 [E, 2I, H] with [E, H, I], or [E, H, 2I] with [E, I, H]",
                gate_up.shape, down.shape
            )))
        }
    };
    let (num_experts, h, i) = (g[0], hidden, inter);

    let (gate_up_bias, down_bias, bias_dtype) = match names.biases {
        None => (None, None, None),
        Some((gb, db)) => {
            let (gb, db) = (format!("{prefix}.{gb}"), format!("{prefix}.{db}"));
            match (entry(ckpt, &gb), entry(ckpt, &db)) {
                (None, None) => (None, None, None),
                (Some(gbe), Some(dbe)) => {
                    if gbe.shape != [num_experts, 2 * i] || dbe.shape != [num_experts, h] {
                        return Err(err(format!(
                            "biases `{gb}` {:?} and `{db}` {:?} should be [{num_experts}, {}] and \
                             [{num_experts}, {h}]",
                            gbe.shape,
                            dbe.shape,
                            2 * i
                        )));
                    }
                    let dtype = same_dtype(ckpt, prefix, &[(&gb, gbe), (&db, dbe)])?;
                    (Some(gb), Some(db), Some(dtype))
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(err(format!("only one of `{gb}` and `{db}` is present")))
                }
            }
        }
    };
    let weights = Weights {
        prefix,
        hidden: h,
        inter: i,
        dtype,
        pack,
        packing: Packing::find(mx, pack),
    };
    let mx_scales = names
        .mx_scales
        .map(|(g, d)| (format!("{prefix}.{g}"), format!("{prefix}.{d}")));
    let quantization = quant::fused(
        ckpt,
        &weights,
        (name, &down_name),
        mx_scales,
        num_experts,
        (transposed, interleaved),
    )?;
    Ok(Some(MoeLayer {
        prefix: prefix.to_string(),
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype,
        pack,
        quantization,
        tensors: ExpertTensors::Fused(FusedTensors {
            gate_up: name.to_string(),
            down: down_name,
            gate_up_bias,
            down_bias,
            transposed,
            interleaved,
        }),
    }))
}

/// The number of routed experts `config.json` declares, if it does.
fn config_num_experts(ckpt: &Checkpoint) -> Option<usize> {
    let config = ckpt.config()?;
    let scopes = [Some(config), config.get("text_config")];
    scopes.into_iter().flatten().find_map(|scope| {
        NUM_EXPERTS_KEYS.iter().find_map(|key| {
            key.split('.')
                .try_fold(scope, |v, k| v.get(k))?
                .as_u64()
                .map(|n| n as usize)
        })
    })
}

/// The stacked group whose gate tensor is `name`, if `name` is one (DBRX).
fn stacked_group(ckpt: &Checkpoint, name: &str, gate: &TensorEntry) -> Result<Option<MoeLayer>> {
    let Some((prefix, [_, up_suffix, down_suffix])) = STACKED_NAMES.iter().find_map(|names| {
        let prefix = name.strip_suffix(names[0])?.strip_suffix('.')?;
        Some((prefix, *names))
    }) else {
        return Ok(None);
    };
    let err = |reason: String| layout_error(ckpt, prefix, reason);
    let (up_name, down_name) = (
        format!("{prefix}.{up_suffix}"),
        format!("{prefix}.{down_suffix}"),
    );
    let (Some(up), Some(down)) = (entry(ckpt, &up_name), entry(ckpt, &down_name)) else {
        return Err(err(format!(
            "`{name}` needs `{up_name}` and `{down_name}` beside it (experts stacked as [E·I, H])"
        )));
    };
    if gate.shape.len() != 2 || up.shape != gate.shape || down.shape != gate.shape {
        return Err(err(format!(
            "`{name}` {:?}, `{up_name}` {:?} and `{down_name}` {:?} should all be [E·I, H]",
            gate.shape, up.shape, down.shape
        )));
    }
    let num_experts = config_num_experts(ckpt).ok_or_else(|| {
        err(format!(
            "`{name}` {:?} stacks all experts' rows; config.json must say how many experts              there are (one of {})",
            gate.shape,
            NUM_EXPERTS_KEYS.join(", ")
        ))
    })?;
    let (rows, h) = (gate.shape[0], gate.shape[1]);
    if num_experts == 0 || rows == 0 || h == 0 || !rows.is_multiple_of(num_experts) {
        return Err(err(format!(
            "`{name}` {:?} does not hold {num_experts} experts (config.json) of equal size",
            gate.shape
        )));
    }
    let dtype = same_dtype(
        ckpt,
        prefix,
        &[(name, gate), (&up_name, up), (&down_name, down)],
    )?;
    let i = rows / num_experts;
    let weights = Weights {
        prefix,
        hidden: h,
        inter: i,
        dtype,
        pack: 1,
        packing: Packing::find(false, 1),
    };
    // No companions are known for this layout: fp8 weights fail here for want of scales.
    let quantization = quant::per_expert(ckpt, &weights, ["w1", "v1", "w2"], Default::default())?;
    Ok(Some(MoeLayer {
        prefix: prefix.to_string(),
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype: None,
        pack: 1,
        quantization,
        tensors: ExpertTensors::Stacked(StackedTensors {
            gate: name.to_string(),
            up: up_name,
            down: down_name,
        }),
    }))
}

/// All entries (at least one) must share one dtype, and it must be sliceable per element.
fn same_dtype(ckpt: &Checkpoint, prefix: &str, entries: &[(&str, &TensorEntry)]) -> Result<Dtype> {
    let (first_name, first) = (entries[0].0, entries[0].1.dtype);
    if let Some((name, other)) = entries.iter().find(|(_, e)| e.dtype != first) {
        return Err(layout_error(
            ckpt,
            prefix,
            format!(
                "mixes dtypes: `{first_name}` is {first}, `{name}` is {}",
                other.dtype
            ),
        ));
    }
    if elem_bytes(first).is_none() {
        return Err(layout_error(
            ckpt,
            prefix,
            format!("dtype {first} packs several values per byte and cannot be sliced per element"),
        ));
    }
    Ok(first)
}

/// What one expert of a per-expert candidate group holds.
#[derive(Default)]
struct ExpertEntries<'c> {
    /// Weights `[0..3]` and biases `[3..6]`, in [`Part`] order.
    tensors: [Option<Found<'c>>; 6],
    /// Companions by kind, `[gate, up, down]`.
    companions: BTreeMap<&'static str, [Option<Found<'c>>; 3]>,
    /// A tensor of a gate/up/down module that is neither weight, bias nor a known companion
    /// (`weight_scale_2`, `weight_zero_point`, `qweight`, ...): a scheme the loader does
    /// not know.
    foreign: bool,
}

type ExpertNames<'c> = BTreeMap<usize, ExpertEntries<'c>>;

/// Groups `P.{e}.{gate|up|down}.{weight|bias}` names by prefix and naming scheme.
fn per_expert_candidates(ckpt: &Checkpoint) -> Vec<(String, &'static Naming, ExpertNames<'_>)> {
    let unloaded_config = quant::QuantConfig::unsupported(ckpt.config());
    let config = quant::QuantConfig::from_config(ckpt.config());
    let int_bits = config.and_then(|c| c.int_bits);
    let mut groups: BTreeMap<(String, usize), ExpertNames> = BTreeMap::new();
    for (name, entry) in ckpt.entries() {
        let mut parts = name.rsplitn(4, '.');
        let (Some(kind_name), Some(module), Some(expert), Some(prefix)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let kind = match kind_name {
            // compressed-tensors names its packed integer weights `weight_packed`.
            "weight" | "weight_packed" => Some(0),
            "bias" => Some(3),
            _ => None,
        };
        let companion = quant::companion_kind(kind_name);
        let Ok(expert) = expert.parse::<usize>() else {
            continue;
        };
        if prefix
            .rsplit('.')
            .next()
            .is_some_and(|last| last.contains("shared"))
        {
            continue; // shared experts are dense weights, not routed experts
        }
        for (n, naming) in NAMINGS.iter().enumerate() {
            let slot = [naming.gate, naming.up, naming.down]
                .iter()
                .position(|m| *m == module);
            if let Some(slot) = slot {
                let experts = groups.entry((prefix.to_string(), n)).or_default();
                let found = experts.entry(expert).or_default();
                match (kind, companion) {
                    (Some(kind), _) => found.tensors[kind + slot] = Some((name, entry)),
                    (None, Some(c)) => {
                        found.companions.entry(c.name).or_default()[slot] = Some((name, entry))
                    }
                    (None, None) => found.foreign = true,
                }
            }
        }
    }
    groups
        .into_iter()
        // A group must have at least one gate weight; a lone `0.linear.weight` elsewhere in a
        // model is not an expert group.
        .filter(|(_, experts)| experts.values().any(|e| e.tensors[0].is_some()))
        // Unknown tensors beside the weights, or integer weights (packed values), belong to
        // a quantization the loader does not know: `unsupported_groups` names them.
        // Scales under a quantization_config the loader does not load mean something else.
        .filter(|(_, experts)| {
            unloaded_config.is_none() || experts.values().all(|e| e.companions.is_empty())
        })
        .filter(|(_, experts)| {
            let packed = experts
                .values()
                .any(|e| e.companions.contains_key("weight_scale_2"));
            // Integer weights with scales beside them (or named `weight_packed`) pack values
            // as only a known scheme says; alone, they are plain data, loaded as stored.
            let scaled = experts.values().any(|e| !e.companions.is_empty());
            !experts.values().any(|e| {
                e.foreign
                    || e.tensors[..3].iter().flatten().any(|(name, t)| {
                        let named = name.ends_with(".weight_packed");
                        let bits = named.then_some(int_bits).flatten();
                        (scaled || named) && quant::packing(t.dtype, packed, bits).is_none()
                    })
            })
        })
        .map(|((prefix, n), experts)| (prefix, &NAMINGS[n], experts))
        .collect()
}

fn per_expert_group(
    ckpt: &Checkpoint,
    prefix: String,
    naming: &'static Naming,
    experts: ExpertNames<'_>,
) -> Result<MoeLayer> {
    let err = |reason: String| layout_error(ckpt, &prefix, reason);
    let num_experts = experts.len();
    if let Some(missing) = (0..num_experts).find(|e| !experts.contains_key(e)) {
        let last = experts.keys().next_back().copied().unwrap_or(0);
        return Err(err(format!(
            "expert {missing} is missing (found {num_experts} experts numbered up to {last})"
        )));
    }
    let modules = [naming.gate, naming.up, naming.down];
    let has_bias = experts
        .values()
        .any(|e| e.tensors[3..].iter().any(Option::is_some));
    let kinds = if has_bias { 6 } else { 3 };
    // found[kind][expert], kinds in `Part` order
    let mut found: [Vec<(&str, &TensorEntry)>; 6] = Default::default();
    for (e, tensors) in &experts {
        for k in 0..kinds {
            let kind = if k < 3 { "weight" } else { "bias" };
            let tensor = tensors.tensors[k].ok_or_else(|| {
                err(format!(
                    "`{prefix}.{e}.{}.{kind}` is missing",
                    modules[k % 3]
                ))
            })?;
            found[k].push(tensor);
        }
    }
    let (first_name, first) = found[0][0];
    if first.shape.len() != 2 {
        return Err(err(format!(
            "`{first_name}` has shape {:?}; expected [I, H]",
            first.shape
        )));
    }
    let packed = experts
        .values()
        .any(|e| e.companions.contains_key("weight_scale_2"));
    let int_bits = first_name
        .ends_with(".weight_packed")
        .then(|| quant::QuantConfig::from_config(ckpt.config())?.int_bits)
        .flatten();
    let pack = quant::packing(first.dtype, packed, int_bits).unwrap_or(1);
    let (i, stored_h) = (first.shape[0], first.shape[1]);
    let h = stored_h * pack;
    if i == 0 || h == 0 {
        return Err(err(format!(
            "`{first_name}` has shape {:?}: an expert cannot be empty",
            first.shape
        )));
    }
    if !i.is_multiple_of(pack) {
        return Err(err(format!(
            "`{first_name}` has {i} rows, which do not pack {pack} values a byte in down's rows"
        )));
    }
    let expected: [&[usize]; 6] = [
        &[i, stored_h],
        &[i, stored_h],
        &[h, i / pack],
        &[i],
        &[i],
        &[h],
    ];
    for k in 0..kinds {
        if let Some((name, e)) = found[k].iter().find(|(_, e)| e.shape != expected[k]) {
            return Err(err(format!(
                "`{name}` has shape {:?}; expected {:?} like `{first_name}`",
                e.shape, expected[k]
            )));
        }
    }
    fn entries<'c>(kinds: &[Vec<(&'c str, &'c TensorEntry)>]) -> Vec<(&'c str, &'c TensorEntry)> {
        kinds.iter().flatten().copied().collect()
    }
    let dtype = same_dtype(ckpt, &prefix, &entries(&found[..3]))?;
    let bias_dtype = has_bias
        .then(|| same_dtype(ckpt, &prefix, &entries(&found[3..])))
        .transpose()?;
    let names = found.map(|tensors| {
        tensors
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<Vec<_>>()
    });
    let [g, u, d, gb, ub, db] = names;
    let mut companions = PerExpertFound::new();
    for (e, found) in experts.into_values().enumerate() {
        for (kind, slots) in found.companions {
            let kind_experts = companions.entry(kind).or_default();
            kind_experts.resize(e, [None; 3]); // experts before `e` lack this kind
            kind_experts.push(slots);
        }
    }
    for kind_experts in companions.values_mut() {
        kind_experts.resize(num_experts, [None; 3]);
    }
    let weights = Weights {
        prefix: &prefix,
        hidden: h,
        inter: i,
        dtype,
        pack,
        packing: Packing::find(false, pack),
    };
    let quantization = quant::per_expert(ckpt, &weights, modules, companions)?;
    Ok(MoeLayer {
        num_experts,
        hidden_size: h,
        intermediate_size: i,
        dtype,
        bias_dtype,
        pack,
        quantization,
        tensors: ExpertTensors::PerExpert(PerExpertTensors {
            naming,
            weights: [g, u, d],
            biases: has_bias.then_some([gb, ub, db]),
        }),
        prefix,
    })
}

/// Orders `layers.2` before `layers.10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(String, u64)> {
        s.split('.')
            .map(|part| match part.parse::<u64>() {
                Ok(n) => (String::new(), n),
                Err(_) => (part.to_string(), 0),
            })
            .collect()
    };
    key(a).cmp(&key(b))
}
