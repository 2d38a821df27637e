//! Quantized experts: what `quantization_config` declares, and the companion tensors (scales)
//! that ride with each expert weight.
//!
//! A companion maps onto its weight's rows and columns by a [`Grid`]: one value per block of
//! entries, one per row, or one for the whole matrix. Copy plans slice a companion together
//! with its weight through that grid, so that a TP rank or an EP rank reads only the scales
//! of the weights it keeps.
//!
//! What each scheme is (its companion kinds, weight packings and `quant_method`) lives in the
//! tables of [`scheme`]; the rest reads those tables.

mod companion;
mod config;
mod detect;
mod grid;
pub mod scheme;

pub use companion::{Companion, CompanionTensors, Quantization};
pub use config::QuantConfig;
pub(crate) use detect::{fused, per_expert, Found, PerExpertFound, Weights};
pub use grid::Grid;
pub use scheme::{
    companion_kind, is_float, is_quantized_weight, k_first_packing, packing, CompanionKind,
    KFirstPacking, Packing, COMPANION_KINDS, DEFAULT_BLOCK, FOREIGN_QUANT_SUFFIXES,
    K_FIRST_PACKINGS, MX_BLOCK, NVFP4_GLOBAL_SCALES, SCALE_DTYPES,
};
