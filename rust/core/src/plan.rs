//! Copy plans: the byte-level recipe that fills one destination tensor (`w13`, `w2` or a bias)
//! for one TP rank and one list of local experts, touching only the source bytes that rank
//! keeps.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::layout::{ExpertTensors, MatrixView, MoeLayer, Part};

/// Largest destination span of one operation (every operation of a plan is at most this
/// long): the grain of parallel work and of staging windows. Large enough to amortise
/// per-operation overhead, small enough to spread a window over many threads.
pub const OP_BYTES: usize = 1 << 20;

/// The vLLM `FusedMoE` parameters a plan can fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `w13_{kind}`: the companions (scales) of gate then up, on their grid: block scales
    /// `[E_local, 2*ceil(I/tp/bn), ceil(H/bk)]`, per-row `[E_local, 2*I/tp, 1]`, per-tensor
    /// `[E_local, 2]`; `[E_local]` for a kind vLLM keeps once for both (`input_scale`).
    W13Companion(&'static str),
    /// `w2_{kind}`: down's companions: `[E_local, ceil(H/bn), ceil(I/tp/bk)]` block scales,
    /// `[E_local, H, 1]` per row, `[E_local]` per tensor.
    W2Companion(&'static str),
    /// `[E_local, 2*I/tp, H]`: gate rows then up rows of the rank's shard.
    W13,
    /// `[E_local, H, I/tp]`: the rank's columns of down.
    W2,
    /// `[E_local, 2*I/tp]`.
    W13Bias,
    /// `[E_local, H]`: down's bias is not sharded.
    W2Bias,
}

/// The order a plan lands its bytes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// vLLM's layout, gate rows then up rows.
    Destination,
    /// The order a transposed group stores its bytes in (see [`CopyPlan::stored_order`]).
    Stored,
    /// vLLM's layout with gate and up interleaved (see [`CopyPlan::interleaved`]).
    Pairs,
    /// Each expert's destination transposed, input-first (see [`CopyPlan::k_first`]).
    KFirst,
}

/// How a part of an expert is narrowed to the rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Rows,
    Cols,
    Whole,
}

/// Which experts and which tensor-parallel shard a destination holds.
#[derive(Debug, Clone, Copy)]
pub struct LoadRequest<'a> {
    pub tp_rank: usize,
    pub tp_size: usize,
    /// Global expert id of each local slot; an expert may fill several slots (EPLB replicas).
    pub experts: &'a [usize],
    /// The rank's rows of the intermediate dimension, `(first, len)`, where an engine splits
    /// otherwise than evenly (`tp_rank * I/tp`, `I/tp`): vLLM's gpt-oss splits in whole
    /// 32-value blocks with the last rank short, and its block-aligned fp8 TP pads each
    /// rank's share to whole blocks. The shard must fall on the weights' packs; companions
    /// take the blocks that cover it (every value of each block the shard touches), which
    /// a caller that refines the grid narrows itself.
    pub shard: Option<(usize, usize)>,
}

impl LoadRequest<'_> {
    /// The rank's rows of the intermediate dimension, `(first, len)`, checked against
    /// `layer`: the even split (on every pack and scale block) unless `shard` says otherwise.
    fn rows(&self, layer: &MoeLayer) -> std::result::Result<(usize, usize), String> {
        let inter = layer.intermediate_size;
        let Some((first, len)) = self.shard else {
            if !inter.is_multiple_of(self.tp_size) {
                return Err(format!(
                    "intermediate size {inter} does not split into tp_size={} equal shards",
                    self.tp_size
                ));
            }
            layer.check_tp_split(self.tp_size)?;
            let shard = inter / self.tp_size;
            return Ok((self.tp_rank * shard, shard));
        };
        let end = first.checked_add(len).filter(|&end| end <= inter);
        let Some(end) = end else {
            return Err(format!(
                "rows [{first}, {first} + {len}) are not in the intermediate size {inter}"
            ));
        };
        // Down packs its inputs (the intermediate size), AWQ's gate and up their outputs.
        for pack in [layer.pack, layer.out_pack()] {
            if !first.is_multiple_of(pack) || !(end.is_multiple_of(pack) || end == inter) {
                return Err(format!(
                    "rows [{first}, {end}) of the intermediate size cut the {pack}-value packs \
                     of `{}`",
                    layer.tensor_names()[0]
                ));
            }
        }
        Ok((first, len))
    }
}

/// Copies a `rows x cols` matrix of `elem`-byte elements from a strided source into
/// consecutive destination rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub shard: usize,
    /// Absolute file offset of element (0, 0).
    pub src: usize,
    /// Destination offset of element (0, 0); rows follow each other without gaps.
    pub dst: usize,
    pub rows: usize,
    pub cols: usize,
    pub elem: usize,
    pub src_row_stride: usize,
    pub src_col_stride: usize,
}

impl CopyOp {
    pub fn len(&self) -> usize {
        self.rows * self.cols * self.elem
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `r` alone (inside the operation's rows).
    fn row(&self, r: usize) -> CopyOp {
        CopyOp {
            src: self.src + r * self.src_row_stride,
            rows: 1,
            ..*self
        }
    }

    /// Column `c` alone (inside the operation's columns).
    fn col(&self, c: usize) -> CopyOp {
        CopyOp {
            src: self.src + c * self.src_col_stride,
            cols: 1,
            ..*self
        }
    }

    /// Each row is one contiguous run of source bytes.
    pub fn has_contiguous_rows(&self) -> bool {
        self.src_col_stride == self.elem
    }

    /// One past the last source byte read (`src` for an empty operation).
    pub fn src_end(&self) -> usize {
        if self.is_empty() {
            return self.src;
        }
        self.src
            + (self.rows - 1) * self.src_row_stride
            + (self.cols - 1) * self.src_col_stride
            + self.elem
    }

    /// `(len, src_end)` computed without overflow, or `None` where an untrusted size would
    /// wrap around: what plans and the executor check before trusting `len` and `src_end`.
    pub fn checked_extent(&self) -> Option<(usize, usize)> {
        let len = self.rows.checked_mul(self.cols)?.checked_mul(self.elem)?;
        if len == 0 {
            return Some((0, self.src));
        }
        let last_row = (self.rows - 1).checked_mul(self.src_row_stride)?;
        let last_col = (self.cols - 1).checked_mul(self.src_col_stride)?;
        let end = self
            .src
            .checked_add(last_row)?
            .checked_add(last_col)?
            .checked_add(self.elem)?;
        Some((len, end))
    }
}

#[derive(Debug, Clone, Default)]
pub struct CopyPlan {
    ops: Vec<CopyOp>,
    len: usize,
}

impl CopyPlan {
    /// The plan that fills `target` for `request`, after checking the request against the
    /// layer. Its operations are in destination order and tile the destination exactly.
    pub fn new(
        ckpt: &Checkpoint,
        layer: &MoeLayer,
        target: Target,
        request: &LoadRequest,
    ) -> Result<CopyPlan> {
        Self::build(ckpt, layer, target, request, Order::Destination)
    }

    /// The plan of [`CopyPlan::new`] with gate and up interleaved in the `W13` targets
    /// (weights, bias, per-row scales): gate row `r` then up row `r` for every row of the
    /// rank's shard (gate/up pairs along the bias), as vLLM's gpt-oss layers keep them. Where
    /// the checkpoint interleaves them too, each expert's pairs are one run. Other targets
    /// are planned as by [`CopyPlan::new`]; block scales spanning several rows cannot be
    /// interleaved and are refused.
    pub fn interleaved(
        ckpt: &Checkpoint,
        layer: &MoeLayer,
        target: Target,
        request: &LoadRequest,
    ) -> Result<CopyPlan> {
        Self::build(ckpt, layer, target, request, Order::Pairs)
    }

    /// The plan that reads the same bytes as [`CopyPlan::new`] for a group of transposed
    /// fused tensors (`gate_up [E, H, 2I]`, `down [E, I, H]`), in the order the file stores
    /// them, so that every row is a contiguous run and the transpose is left to the caller
    /// (a GPU does it at memory speed; a CPU gather of 2-byte elements does not). Per expert,
    /// `W13` is `[2, H, I/tp]` (gate, then up, each transposed), or `[H, I/tp, 2]` (the
    /// stored gate/up pairs) when interleaved; `W2` is `[I/tp, H]`.
    pub fn stored_order(
        ckpt: &Checkpoint,
        layer: &MoeLayer,
        target: Target,
        request: &LoadRequest,
    ) -> Result<CopyPlan> {
        Self::build(ckpt, layer, target, request, Order::Stored)
    }

    /// The plan of [`CopyPlan::new`] with each expert's destination transposed, input-first,
    /// as vLLM's GPTQ and AWQ Marlin methods keep them (`is_transposed`): per expert, `W13` is
    /// `[H/pack, 2·I/tp/out_pack]` (for each stored input row, gate's columns of the rank's
    /// shard then up's), `W2` is `[I/tp/pack, H/out_pack]`, and a block companion is the
    /// transpose of its grid (`w13_scales [H/group, 2·I/tp]`, `w13_qzeros [H/group,
    /// 2·I/tp/8]`, `w2_scales [I/tp/group, H]`). From a group stored input-first (GPTQ, AWQ)
    /// every row is a contiguous run of the file; from others, a gather.
    pub fn k_first(
        ckpt: &Checkpoint,
        layer: &MoeLayer,
        target: Target,
        request: &LoadRequest,
    ) -> Result<CopyPlan> {
        Self::build(ckpt, layer, target, request, Order::KFirst)
    }

    fn build(
        ckpt: &Checkpoint,
        layer: &MoeLayer,
        target: Target,
        request: &LoadRequest,
        order: Order,
    ) -> Result<CopyPlan> {
        let stored_order = order == Order::Stored;
        let err = |reason: String| Error::Request {
            path: ckpt.path().to_path_buf(),
            prefix: layer.prefix.clone(),
            reason,
        };
        let LoadRequest {
            tp_rank,
            tp_size,
            experts,
            ..
        } = *request;
        if tp_size == 0 || tp_rank >= tp_size {
            return Err(err(format!(
                "tp_rank {tp_rank} is not in [0, tp_size={tp_size})"
            )));
        }
        if let Some(bad) = experts.iter().find(|&&e| e >= layer.num_experts) {
            return Err(err(format!(
                "expert {bad} does not exist (the layer has {} experts)",
                layer.num_experts
            )));
        }
        if matches!(target, Target::W13Bias | Target::W2Bias) && !layer.has_bias() {
            return Err(err(
                "the checkpoint has no expert biases for this layer".into()
            ));
        }
        let (first, shard) = request.rows(layer).map_err(err)?;
        let companion =
            match target {
                Target::W13Companion(kind) | Target::W2Companion(kind) => {
                    let found = layer.quantization.as_ref().and_then(|q| q.companion(kind));
                    Some(found.ok_or_else(|| {
                        err(format!("the checkpoint has no `{kind}` for this layer"))
                    })?)
                }
                _ => None,
            };
        let interleaved = match &layer.tensors {
            ExpertTensors::Fused(f) if f.transposed => f.interleaved,
            _ if !stored_order => false,
            _ => {
                return Err(err(format!(
                    "a {} group is stored in destination order already",
                    layer.format()
                )))
            }
        };
        if stored_order && !matches!(target, Target::W13 | Target::W2) {
            return Err(err(format!("{target:?} has no stored order of its own")));
        }
        // Gate/up pairs: where the file interleaves them too, a gate view widened to take the
        // up entries between its own reads both in file order.
        let pairs = order == Order::Pairs
            && match target {
                Target::W13 | Target::W13Bias => true,
                // Per-tensor scales are `[gate, up]`, a pair already.
                Target::W13Companion(_) => {
                    companion.is_some_and(|c| !c.merged_w13 && c.grid.step(true).is_some())
                }
                _ => false,
            };
        let file_pairs = matches!(&layer.tensors, ExpertTensors::Fused(f) if f.interleaved);
        let parts: &[(Part, Split)] = match target {
            Target::W13Companion(_) if companion.is_some_and(|c| c.merged_w13) => {
                &[(Part::Up, Split::Rows)]
            }
            Target::W13 | Target::W13Companion(_) => {
                &[(Part::Gate, Split::Rows), (Part::Up, Split::Rows)]
            }
            Target::W2 | Target::W2Companion(_) => &[(Part::Down, Split::Cols)],
            Target::W13Bias => &[(Part::GateBias, Split::Cols), (Part::UpBias, Split::Cols)],
            Target::W2Bias => &[(Part::DownBias, Split::Whole)],
        };
        let mut plan = CopyPlan::default();
        for &expert in experts {
            let mut matrices = Vec::with_capacity(parts.len());
            let mut transposed = Vec::with_capacity(parts.len());
            for &(part, split) in parts {
                let matrix = match companion {
                    None => layer.matrix(part, expert),
                    Some(c) => layer.companion_matrix(c.kind.name, part, expert),
                }
                .ok_or_else(|| err(format!("no {part:?} for expert {expert}")))?;
                // A companion value spans `step` entries of the weight (or all of them).
                let step = match (companion, split) {
                    // Packed weights split their stored columns (the input dimension) by packs.
                    (None, Split::Cols) if part == Part::Down => Some(layer.pack),
                    // AWQ packs outputs: gate's and up's rows split by packs.
                    (None, Split::Rows) => Some(layer.out_pack()),
                    (None, _) => Some(1),
                    (Some(c), Split::Rows) => c.grid.step(true),
                    (Some(c), _) => c.grid.step(false),
                };
                if let (true, Some(c)) = (pairs && step != Some(1), companion) {
                    return Err(err(format!(
                        "`{}`: its scales span several rows of gate and up, which cannot be \
                         interleaved",
                        c.tensor_names()[0]
                    )));
                }
                if pairs && file_pairs {
                    // The pairs of the rank's shard, one view from gate's first entry.
                    let both = matrix.pairs(split == Split::Rows);
                    plan.push_matrix(
                        ckpt,
                        &match split {
                            Split::Rows => both.select_rows(2 * first, 2 * shard),
                            _ => both.select_cols(2 * first, 2 * shard),
                        },
                    )?;
                    break;
                }
                // The blocks that cover the shard: exactly its own on an even split.
                let covering = |s: usize| (first / s, (first + shard).div_ceil(s) - first / s);
                let matrix = match (split, step) {
                    (Split::Whole, _) | (_, None) => matrix,
                    (Split::Rows, Some(s)) => {
                        let (at, n) = covering(s);
                        matrix.select_rows(at, n)
                    }
                    (Split::Cols, Some(s)) => {
                        let (at, n) = covering(s);
                        matrix.select_cols(at, n)
                    }
                };
                if pairs {
                    matrices.push((matrix, split));
                } else if order == Order::KFirst {
                    transposed.push(matrix.stored(false));
                } else if !stored_order {
                    plan.push_matrix(ckpt, &matrix)?;
                } else if !(interleaved && part == Part::Up) {
                    // Interleaved up entries sit between the gate's: one run holds both.
                    plan.push_matrix(ckpt, &matrix.stored(interleaved && part == Part::Gate))?;
                }
            }
            match transposed.as_slice() {
                // Each input row of the destination: gate's outputs, then up's.
                [gate, up] => {
                    let (gate, up) = (plan.op_of(ckpt, gate)?, plan.op_of(ckpt, up)?);
                    for r in 0..gate.rows {
                        plan.push(gate.row(r));
                        plan.push(up.row(r));
                    }
                }
                [one] => plan.push_matrix(ckpt, one)?,
                _ => {}
            }
            if let [(gate, split), (up, _)] = matrices.as_slice() {
                // Files that keep gate and up apart: a row (or entry) of each in turn.
                let (gate, up) = (plan.op_of(ckpt, gate)?, plan.op_of(ckpt, up)?);
                for r in 0..shard {
                    for op in [&gate, &up] {
                        plan.push(match split {
                            Split::Rows => op.row(r),
                            _ => op.col(r),
                        });
                    }
                }
            }
        }
        Ok(plan)
    }

    /// The plan that copies tensor `name` whole, or, with `shard = Some((dim, rank, size))`,
    /// the `rank`-th of `size` equal slices along dimension `dim` (a tensor-parallel shard of
    /// a dense weight), packed as a contiguous tensor.
    pub fn tensor(
        ckpt: &Checkpoint,
        name: &str,
        shard: Option<(usize, usize, usize)>,
    ) -> Result<CopyPlan> {
        let (_, entry) = ckpt.tensor(name)?;
        // The header's check guarantees the element count fits; with an empty dimension the
        // others may be anything, so nothing else is multiplied then.
        let numel: usize = entry.shape.iter().product();
        let whole = MatrixView {
            tensor: name.to_string(),
            offset: 0,
            rows: 1,
            cols: numel,
            row_stride: numel,
            col_stride: 1,
        };
        let view = match shard {
            None => whole,
            Some((dim, rank, size)) => {
                let err = |reason: String| Error::Request {
                    path: ckpt.path().to_path_buf(),
                    prefix: name.to_string(),
                    reason,
                };
                let Some(&extent) = entry.shape.get(dim) else {
                    return Err(err(format!(
                        "no dimension {dim} in shape {:?}",
                        entry.shape
                    )));
                };
                if size == 0 || rank >= size || !extent.is_multiple_of(size) {
                    return Err(err(format!(
                        "dimension {dim} of shape {:?} does not split into {size} shards with \
                         shard {rank} among them",
                        entry.shape
                    )));
                }
                if numel == 0 {
                    return Ok(CopyPlan::default());
                }
                // [outer, extent, inner] -> rows of the rank's `extent / size * inner` elements.
                let outer: usize = entry.shape[..dim].iter().product();
                let inner: usize = entry.shape[dim + 1..].iter().product();
                let part = extent / size * inner;
                MatrixView {
                    offset: rank * part,
                    rows: outer,
                    cols: part,
                    row_stride: extent * inner,
                    ..whole
                }
            }
        };
        CopyPlan::view(ckpt, &view)
    }

    /// The plan that copies a strided view of one tensor (`view.col_stride` must be 1 for
    /// whole-row runs), packed as a contiguous tensor: what a weight loader's narrowing of a
    /// checkpoint tensor selects. A view past the tensor's bytes is an error.
    pub fn view(ckpt: &Checkpoint, view: &MatrixView) -> Result<CopyPlan> {
        let mut plan = CopyPlan::default();
        plan.push_matrix(ckpt, view)?;
        Ok(plan)
    }

    /// Destination bytes, which are also the source bytes read.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ops(&self) -> &[CopyOp] {
        &self.ops
    }

    /// Shards the plan reads, each once, in order.
    pub fn shards(&self) -> Vec<usize> {
        let mut shards: Vec<usize> = self.ops.iter().map(|op| op.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Splits the destination into consecutive byte ranges of at most `max_bytes` (or one
    /// operation, if larger) that end on operation boundaries.
    pub fn windows(&self, max_bytes: usize) -> Vec<(usize, usize)> {
        let mut windows = Vec::new();
        let mut start = 0;
        for op in &self.ops {
            let end = op.dst + op.len();
            if end - start > max_bytes && op.dst > start {
                windows.push((start, op.dst));
                start = op.dst;
            }
        }
        if self.len > start {
            windows.push((start, self.len));
        }
        windows
    }

    /// The operations that exactly fill destination bytes `[start, end)`, or `None` if the
    /// range does not begin and end on operation boundaries.
    pub fn ops_in(&self, start: usize, end: usize) -> Option<&[CopyOp]> {
        if start > end || end > self.len {
            return None;
        }
        let first = self.ops.partition_point(|op| op.dst < start);
        let last = self.ops.partition_point(|op| op.dst < end);
        let starts_on_boundary = self.ops.get(first).is_none_or(|op| op.dst == start);
        let ends_on_boundary =
            end == self.len || self.ops.get(last).is_some_and(|op| op.dst == end);
        (starts_on_boundary && ends_on_boundary).then(|| &self.ops[first..last])
    }

    fn push_matrix(&mut self, ckpt: &Checkpoint, m: &MatrixView) -> Result<()> {
        let op = self.op_of(ckpt, m)?;
        self.push(op);
        Ok(())
    }

    /// The operation that copies `m`, checked against its tensor's bytes (its destination
    /// offset is set as it is pushed). Plans of one operation per row take each row of it
    /// ([`CopyOp::row`]) rather than look the tensor up again for every row.
    fn op_of(&self, ckpt: &Checkpoint, m: &MatrixView) -> Result<CopyOp> {
        let (shard, entry) = ckpt.tensor(&m.tensor)?;
        let elem = entry.elem_bytes().ok_or_else(|| Error::Layout {
            path: ckpt.path().to_path_buf(),
            prefix: m.tensor.clone(),
            reason: format!("dtype {} cannot be sliced per element", entry.dtype),
        })?;
        let op = CopyOp {
            shard,
            src: entry.start + m.offset * elem,
            dst: self.len,
            rows: m.rows,
            cols: m.cols,
            elem,
            src_row_stride: m.row_stride * elem,
            src_col_stride: m.col_stride * elem,
        };
        if op.checked_extent().is_none_or(|(_, end)| end > entry.end) {
            return Err(Error::Layout {
                path: ckpt.path().to_path_buf(),
                prefix: m.tensor.clone(),
                reason: format!("a view reaches past the tensor's bytes: {m:?}"),
            });
        }
        Ok(op)
    }

    /// Appends `op` at the end of the destination, merged into whole runs where the source
    /// allows and cut into pieces of at most `OP_BYTES`.
    fn push(&mut self, op: CopyOp) {
        if op.is_empty() {
            return;
        }
        let row_bytes = op.cols * op.elem;
        if op.has_contiguous_rows() && (op.rows == 1 || op.src_row_stride == row_bytes) {
            // The whole matrix is one run: cut it anywhere.
            let total = op.len();
            for at in (0..total).step_by(OP_BYTES) {
                let len = OP_BYTES.min(total - at);
                self.append(CopyOp {
                    src: op.src + at,
                    rows: 1,
                    cols: len,
                    elem: 1,
                    src_row_stride: len,
                    src_col_stride: 1,
                    ..op
                });
            }
            return;
        }
        if row_bytes > OP_BYTES {
            // Rows too long for one operation: cut each row along its columns.
            let cols_per_op = OP_BYTES / op.elem;
            for r in 0..op.rows {
                for first in (0..op.cols).step_by(cols_per_op) {
                    self.push(CopyOp {
                        src: op.src + r * op.src_row_stride + first * op.src_col_stride,
                        rows: 1,
                        cols: cols_per_op.min(op.cols - first),
                        ..op
                    });
                }
            }
            return;
        }
        let rows_per_op = (OP_BYTES / row_bytes).max(1);
        for first in (0..op.rows).step_by(rows_per_op) {
            self.append(CopyOp {
                src: op.src + first * op.src_row_stride,
                rows: rows_per_op.min(op.rows - first),
                ..op
            });
        }
    }

    fn append(&mut self, op: CopyOp) {
        let op = CopyOp {
            dst: self.len,
            ..op
        };
        self.len += op.len();
        self.ops.push(op);
    }
}
