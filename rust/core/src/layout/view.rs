//! Strided views: where one expert's matrix lies inside a stored tensor.

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
