//! How a companion's values lie over the entries of its weight.

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
