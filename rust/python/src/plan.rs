//! `CopyPlan`: a plan bound to the checkpoint it reads, executed with the GIL released.

use std::sync::Arc;

use fastmoe_load_core::CopyPlan;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::checkpoint::State;
use crate::errors::to_py;

#[pyclass(name = "CopyPlan", module = "fastmoe_load._fastmoe_load", frozen)]
pub struct PyCopyPlan {
    plan: CopyPlan,
    state: Arc<State>,
}

impl PyCopyPlan {
    pub fn new(plan: CopyPlan, state: Arc<State>) -> Self {
        PyCopyPlan { plan, state }
    }
}

#[pymethods]
impl PyCopyPlan {
    /// Destination bytes; also the bytes read from the checkpoint.
    #[getter]
    fn nbytes(&self) -> usize {
        self.plan.len()
    }

    #[getter]
    fn num_ops(&self) -> usize {
        self.plan.ops().len()
    }

    /// Consecutive `(start, end)` destination ranges of at most `max_bytes` each (or one
    /// operation, if larger), to fill staging buffers of that size.
    fn windows(&self, max_bytes: usize) -> Vec<(usize, usize)> {
        self.plan.windows(max_bytes)
    }

    /// Fails if a file the plan reads changed since the checkpoint was opened.
    fn check_intact(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.state.ckpt.check_intact(self.plan.shards()))
            .map_err(to_py)
    }

    /// Writes destination bytes `[start, end)` to the memory at `address`.
    ///
    /// `address` must point to at least `end - start` writable bytes that nothing else touches
    /// during the call: a CPU tensor's or pinned buffer's `data_ptr()`.
    #[pyo3(signature = (address, start=0, end=None))]
    fn execute(
        &self,
        py: Python<'_>,
        address: usize,
        start: usize,
        end: Option<usize>,
    ) -> PyResult<()> {
        let end = end.unwrap_or(self.plan.len());
        let ops = self.plan.ops_in(start, end).ok_or_else(|| {
            PyValueError::new_err(format!(
                "[{start}, {end}) is not a window of this plan of {} bytes",
                self.plan.len()
            ))
        })?;
        if address == 0 && end > start {
            return Err(PyValueError::new_err("null destination address"));
        }
        let state = &self.state;
        py.detach(|| {
            state.ckpt.check_intact(self.plan.shards())?;
            // SAFETY: the caller provides `end - start` writable bytes at `address` (see the
            // method's contract); the executor checks every operation against that window.
            unsafe {
                state.executor.run(
                    state.ckpt.shards(),
                    ops,
                    address as *mut u8,
                    start,
                    end - start,
                )
            }
        })
        .map_err(to_py)
    }
}
