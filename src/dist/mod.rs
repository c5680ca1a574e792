//! Several processes: PyTorch's distributed runtime (c10d) from Rust, and what data parallelism
//! builds on it.
//!   c10d.rs           the shim's process group: rendezvous, all-reduce, broadcast, barrier
//!   world.rs          who this process is: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
//!                     MASTER_ADDR, MASTER_PORT), the group made from them
//!   data_parallel.rs  a rank's share of a global batch, gradients all-reduced in buckets,
//!                     parameters broadcast, sums reduced
pub mod c10d;
pub mod data_parallel;
pub mod world;

pub use c10d::{Backend, ProcessGroup, ReduceOp, Rendezvous};
pub use world::World;
