//! `fastmoe_load._fastmoe_load`: the thin binding between the Rust core and the Python
//! package. The public API lives in Python; this module exposes checkpoints, layer
//! descriptions, copy plans and their execution with the GIL released.

mod checkpoint;
mod errors;
mod plan;
mod state;

use pyo3::prelude::*;

#[pymodule]
fn _fastmoe_load(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<checkpoint::PyCheckpoint>()?;
    m.add_class::<checkpoint::ShardBuffer>()?;
    m.add_class::<checkpoint::MoeLayerInfo>()?;
    m.add_class::<checkpoint::CompanionInfo>()?;
    m.add_class::<plan::PyCopyPlan>()?;
    m.add_class::<plan::FillTicket>()?;
    Ok(())
}
