//! distill: knowledge distillation for Llama-family causal LMs on libtorch.
//! The map of this crate is docs/ARCHITECTURE.md; each module has one idea.
pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod fingerprint;
pub mod generate;
pub mod io;
pub mod losses;
pub mod model;
pub mod objective;
pub mod prune_width;
pub mod report;
pub mod student;
pub mod teacher;
pub mod train;

pub use error::{Error, Result};
