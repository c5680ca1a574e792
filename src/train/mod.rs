//! Training: the recipe in phases (`run`), one micro-step (`step`), the optimizer and schedules
//! (`optim`), the `[run]` options (`options`), the output folder (`output`), checkpoints
//! (`checkpoint`), the state a checkpoint carries (`state`), the hidden-state terms' layer maps and
//! projections (`hidden`), on-policy steps on the student's own samples (`onpolicy`; DistiLLM's
//! adaptive mode with its replay buffer: `distillm`), a run in stages (`stages`: progressive
//! pruning), PACED's pass-rate weights (`paced`) with the answer checks (`answer_check`), a teacher-query budget's
//! split micro-batches (`budget`), the predicted peak memory and step time (`plan`), a run over
//! several processes (`parallel`), and the fault-test hooks (`faults`).
pub mod answer_check;
pub mod budget;
pub mod checkpoint;
pub mod distillm;
pub mod faults;
pub mod hidden;
pub mod onpolicy;
pub mod optim;
pub mod options;
pub mod output;
pub mod paced;
pub mod parallel;
pub mod plan;
pub mod run;
pub mod stages;
pub mod state;
pub mod step;

pub use run::{plan, train, TrainOptions, TrainSummary};
