//! A detected routed-expert group and where each expert's matrices (and their companions)
//! lie in its tensors.

use safetensors::tensor::Dtype;

use super::naming::Naming;
use super::view::MatrixView;
use crate::quant::{CompanionTensors, Grid, Quantization};

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
    /// The weights and their block companions are stored input-first, the transpose of the
    /// `[out, in]` matrix (GPTQ's `qweight [in/pack, out]`, AWQ's `[in, out/8]`, their
    /// `scales [in/group, out]` and `qzeros`): views carry the strides.
    pub k_first: bool,
    /// Values one stored weight element holds along the output dimension: `32 / bits` for
    /// AWQ, else 1 (see `MoeLayer::pack` for the input dimension).
    pub out_pack: usize,
    /// Tensors of the group that no destination takes and the engines discard (GPTQ's
    /// `g_idx`): consumed with it, never copied.
    pub discarded: Vec<String>,
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

    /// Values one stored weight element holds along the output dimension (AWQ's `32 / bits`),
    /// else 1.
    pub fn out_pack(&self) -> usize {
        match &self.tensors {
            ExpertTensors::PerExpert(p) => p.out_pack,
            _ => 1,
        }
    }

    /// Tensors of the group that no destination takes (GPTQ's `g_idx`).
    pub fn discarded(&self) -> &[String] {
        match &self.tensors {
            ExpertTensors::PerExpert(p) => &p.discarded,
            _ => &[],
        }
    }

    /// The weights (and their block companions) are stored input-first (GPTQ, AWQ).
    pub fn k_first(&self) -> bool {
        matches!(&self.tensors, ExpertTensors::PerExpert(p) if p.k_first)
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
        if let ExpertTensors::PerExpert(p) = &self.tensors {
            names.extend(p.discarded.iter().map(String::as_str));
        }
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
        // Input-first files store a block grid transposed, `[cols, rows]`.
        let k_first = self.k_first() && matches!(companion.grid, Grid::Block { .. });
        let (tensor, offset, row_stride) = match &companion.tensors {
            CompanionTensors::PerExpert(tensors) if k_first => {
                return Some(MatrixView {
                    tensor: tensors[slot][expert].clone(),
                    offset: 0,
                    rows,
                    cols,
                    row_stride: 1,
                    col_stride: rows,
                })
            }
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
        if self.out_pack() > 1 {
            steps.push((self.out_pack(), &weight_name));
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
                let (pack, out) = (self.pack, p.out_pack);
                let (tensors, rows, cols) = match part {
                    Part::Gate => (&p.weights[0], i / out, h / pack),
                    Part::Up => (&p.weights[1], i / out, h / pack),
                    Part::Down => (&p.weights[2], h / out, i / pack),
                    Part::GateBias => (&p.biases.as_ref()?[0], 1, i),
                    Part::UpBias => (&p.biases.as_ref()?[1], 1, i),
                    Part::DownBias => (&p.biases.as_ref()?[2], 1, h),
                };
                let bias = matches!(part, Part::GateBias | Part::UpBias | Part::DownBias);
                if p.k_first && !bias {
                    // Stored `[cols, rows]`: the matrix is its transpose.
                    return Some(view(&tensors[expert], 0, rows, cols, 1, rows));
                }
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
