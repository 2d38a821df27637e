//! `State`: what an open checkpoint owns, shared by the `Checkpoint` handle and every plan
//! made from it. Its own module so that `checkpoint` and `plan` both depend on it and not on
//! each other.

use std::sync::OnceLock;

use fastmoe_load_core::{detect, Checkpoint, Executor, MoeLayer};
use pyo3::prelude::*;

use crate::errors::{to_py, TensorNotFoundError};

/// Everything an open checkpoint owns; shared with the plans made from it, so a plan stays
/// usable (and its files mapped) after `close()`.
pub struct State {
    pub ckpt: Checkpoint,
    pub executor: Executor,
    interleaved: Option<bool>,
    layers: OnceLock<Vec<MoeLayer>>,
}

impl State {
    pub fn new(ckpt: Checkpoint, executor: Executor, interleaved: Option<bool>) -> Self {
        State {
            ckpt,
            executor,
            interleaved,
            layers: OnceLock::new(),
        }
    }

    /// The routed-expert groups, detected on first use.
    pub fn layers(&self) -> PyResult<&[MoeLayer]> {
        if let Some(layers) = self.layers.get() {
            return Ok(layers);
        }
        let layers = detect(&self.ckpt, self.interleaved).map_err(to_py)?;
        Ok(self.layers.get_or_init(|| layers))
    }

    pub fn layer(&self, prefix: &str) -> PyResult<&MoeLayer> {
        let layers = self.layers()?;
        layers.iter().find(|l| l.prefix == prefix).ok_or_else(|| {
            let known: Vec<&str> = layers.iter().map(|l| l.prefix.as_str()).take(4).collect();
            TensorNotFoundError::new_err(format!(
                "{}: no routed-expert group at `{prefix}` (the checkpoint has {} groups{}{})",
                self.ckpt.path().display(),
                layers.len(),
                if known.is_empty() { "" } else { ", e.g. " },
                known.join(", ")
            ))
        })
    }
}
