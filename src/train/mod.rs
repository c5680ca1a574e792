//! Training: the recipe (`run`), the optimizer and schedules (`optim`), checkpoints (`checkpoint`)
//! and the state a checkpoint carries (`state`).
pub mod checkpoint;
pub mod optim;
pub mod run;
pub mod state;

pub use run::{train, TrainOptions, TrainSummary};
