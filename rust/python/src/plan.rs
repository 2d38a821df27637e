//! `CopyPlan`: a plan bound to the checkpoint it reads, executed with the GIL released, at
//! once (`execute`) or in the background (`submit`, which returns a `FillTicket`).

use std::sync::{Arc, Mutex};

use fastmoe_load_core::{CopyOp, CopyPlan, Ticket};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::state::State;

#[pyclass(name = "CopyPlan", module = "fastmoe_load._fastmoe_load", frozen)]
pub struct PyCopyPlan {
    plan: Arc<CopyPlan>,
    state: Arc<State>,
}

impl PyCopyPlan {
    pub fn new(plan: CopyPlan, state: Arc<State>) -> Self {
        PyCopyPlan {
            plan: Arc::new(plan),
            state,
        }
    }

    /// The operations filling `[start, end)`, after checking the range, the address and the
    /// files.
    fn window(
        &self,
        address: usize,
        start: usize,
        end: Option<usize>,
    ) -> PyResult<(&[CopyOp], usize)> {
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
        self.state
            .ckpt
            .check_intact(self.plan.shards())
            .map_err(to_py)?;
        Ok((ops, end))
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
        let (ops, end) = self.window(address, start, end)?;
        // SAFETY: the caller provides `end - start` writable bytes at `address` (see the
        // method's contract).
        py.detach(|| unsafe { fill_window(&self.state, ops, address, start, end) })
            .map_err(to_py)
    }

    /// Starts writing destination bytes `[start, end)` to `address` on the copy threads and
    /// returns at once. `buffer` is the object owning that memory: the ticket keeps it alive,
    /// and waits for the copy before letting go of it. Nothing else may touch the memory
    /// until the ticket is waited for.
    fn submit(
        &self,
        address: usize,
        start: usize,
        end: usize,
        buffer: Py<PyAny>,
    ) -> PyResult<FillTicket> {
        self.window(address, start, Some(end))?;
        let (state, plan) = (self.state.clone(), self.plan.clone());
        let ticket = self
            .state
            .executor
            .spawn(move || {
                let ops = plan.ops_in(start, end).unwrap_or_default();
                // SAFETY: `buffer` owns `end - start` writable bytes at `address` and is kept
                // alive by the ticket until this job is done.
                unsafe { fill_window(&state, ops, address, start, end) }
            })
            .map_err(to_py)?;
        Ok(FillTicket {
            ticket: Mutex::new(Some(ticket)),
            _buffer: buffer,
        })
    }
}

/// Writes destination bytes `[start, end)` of `ops` to `address`; the executor checks every
/// operation against that window.
///
/// # Safety
/// `address` must be valid for writes of `end - start` bytes, untouched by anything else,
/// until this returns.
unsafe fn fill_window(
    state: &State,
    ops: &[CopyOp],
    address: usize,
    start: usize,
    end: usize,
) -> fastmoe_load_core::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        state.executor.run(
            state.ckpt.shards(),
            ops,
            address as *mut u8,
            start,
            end - start,
        )
    }
}

/// A fill running on the copy threads. Dropping it waits for the fill, so the memory it
/// writes is never freed under it.
#[pyclass(module = "fastmoe_load._fastmoe_load", frozen)]
pub struct FillTicket {
    ticket: Mutex<Option<Ticket>>,
    _buffer: Py<PyAny>,
}

impl FillTicket {
    fn take(&self) -> Option<Ticket> {
        self.ticket.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl FillTicket {
    /// Waits for the fill (GIL released) and raises its error, if any; later calls return.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        match self.take() {
            Some(ticket) => py.detach(|| ticket.wait()).map_err(to_py),
            None => Ok(()),
        }
    }
}

impl Drop for FillTicket {
    fn drop(&mut self) {
        if let Some(ticket) = self.take() {
            // The copy threads never need the GIL, so waiting while holding it cannot deadlock.
            let _ = ticket.wait();
        }
    }
}
