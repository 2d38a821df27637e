//! Finding routed-expert groups in a checkpoint and describing each expert's matrices as
//! strided views of the stored tensors.
//!
//! The layout is read from names and from the shapes of *both* the gate/up and the down
//! tensor, never from one tensor alone: a square `[E, H, H]` tensor says nothing about its
//! orientation, but `gate_up [E, 2I, H]` beside `down [E, H, I]` does.
//!
//! The names each layout goes by are the tables of [`naming`]; a new naming scheme is a new
//! row there.

mod check;
mod detect;
mod fused;
mod layer;
pub mod naming;
mod per_expert;
mod stacked;
mod view;

pub(crate) use detect::natural_cmp;
pub use detect::{detect, detect_groups, Detected, FailedGroup};
pub use layer::{ExpertTensors, FusedTensors, MoeLayer, Part, PerExpertTensors, StackedTensors};
pub use naming::{Naming, GATE_UP_METADATA_KEY, NAMINGS};
pub use view::MatrixView;
