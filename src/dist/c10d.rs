//! PyTorch's distributed runtime (c10d) through the shim `csrc/c10d_shim.cpp`, compiled by build.rs
//! against the headers of the libtorch that tch links: a TCPStore rendezvous and a process group
//! (Gloo for CPU tensors, NCCL for CUDA tensors when the build has it), with in-place all-reduce,
//! broadcast and barrier. Every call blocks until its work is done or the group's timeout passes;
//! a failure (a peer gone, a timeout) comes back as `Error::Distributed`, never as an abort.
use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use tch::Tensor;

extern "C" {
    fn distill_c10d_has_nccl() -> c_int;
    fn distill_c10d_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_longlong,
        agent_store: c_int,
        prefix: *const c_char,
        nccl: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn distill_c10d_free(group: *mut c_void);
    fn distill_c10d_free_message(m: *mut c_char);
    fn distill_c10d_all_reduce(
        group: *mut c_void,
        tensors: *mut *mut c_void,
        n: c_int,
        op: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn distill_c10d_broadcast(
        group: *mut c_void,
        tensors: *mut *mut c_void,
        n: c_int,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn distill_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// What a failed collective's message ends with (a command other than training replaces it).
pub const GONE_HINT: &str = "another rank has stopped or cannot be reached (resume the run from its last checkpoint with --resume)";

/// Whether this build can make NCCL process groups (libtorch with CUDA, headers found at build).
pub fn has_nccl() -> bool {
    // SAFETY: a constant of the shim
    unsafe { distill_c10d_has_nccl() != 0 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Max = 1,
    Min = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

/// Where and how to meet the other ranks.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub host: String,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    pub timeout: std::time::Duration,
    /// the TCPStore server is someone else's (torchrun's agent): every rank is a client
    pub agent_store: bool,
    /// a prefix for the store's keys (torchrun's restarts: "/worker/attempt_N")
    pub prefix: String,
    pub backend: Backend,
    /// where host values go for a collective (a CUDA device for NCCL, which has no CPU tensors)
    pub device: tch::Device,
}

/// A process group; dropped, it closes its connections.
pub struct ProcessGroup {
    raw: *mut c_void,
    pub rank: usize,
    pub world: usize,
    pub device: tch::Device,
}

// SAFETY: the c10d backend is thread-safe for the calls the shim makes; the handle is used by one
// thread at a time (calls take &self but block until done).
unsafe impl Send for ProcessGroup {}

fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd copy, freed here once
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { distill_c10d_free_message(err) };
    // c10d appends C++ frames after the first line
    let cut = s.find("\nException raised from").unwrap_or(s.len());
    s[..cut].trim().to_string()
}

impl ProcessGroup {
    /// Meet the other ranks (blocks until all `world` have joined or the timeout passes).
    pub fn new(r: &Rendezvous) -> Result<ProcessGroup> {
        let fail = |msg: String| Error::Distributed {
            rank: r.rank,
            op: format!("rendezvous at {}:{}", r.host, r.port),
            msg,
        };
        if r.world == 0 || r.rank >= r.world {
            return Err(fail(format!(
                "rank {} is not below the world size {}",
                r.rank, r.world
            )));
        }
        let host = CString::new(r.host.as_str()).map_err(|e| fail(e.to_string()))?;
        let prefix = CString::new(r.prefix.as_str()).map_err(|e| fail(e.to_string()))?;
        let mut err: *mut c_char = std::ptr::null_mut();
        let timeout_ms = r.timeout.as_millis().min(i64::MAX as u128) as c_longlong;
        // SAFETY: valid C strings for the call's duration; err receives a message or stays null
        let raw = unsafe {
            distill_c10d_new(
                host.as_ptr(),
                r.port as c_int,
                r.rank as c_int,
                r.world as c_int,
                timeout_ms,
                r.agent_store as c_int,
                prefix.as_ptr(),
                (r.backend == Backend::Nccl) as c_int,
                &mut err,
            )
        };
        if raw.is_null() {
            return Err(fail(take_message(err)));
        }
        Ok(ProcessGroup {
            raw,
            rank: r.rank,
            world: r.world,
            device: r.device,
        })
    }

    fn check(&self, rc: c_int, err: *mut c_char, op: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        Err(Error::Distributed {
            rank: self.rank,
            op: op.into(),
            msg: format!("{}; {GONE_HINT}", take_message(err)),
        })
    }

    /// Each tensor reduced in place across the ranks (every rank ends with the same values). The
    /// tensors are all started before the first is waited for. They must be contiguous.
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: ReduceOp, what: &str) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let mut ptrs: Vec<*mut c_void> = tensors
            .iter_mut()
            .map(|t| t.as_mut_ptr() as *mut c_void)
            .collect();
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: the pointers are live tch tensors (at::Tensor*) for the call's duration
        let rc = unsafe {
            distill_c10d_all_reduce(
                self.raw,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                op as c_int,
                &mut err,
            )
        };
        self.check(rc, err, &format!("all-reduce of {what}"))
    }

    /// Each tensor replaced in place by rank `root`'s.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize, what: &str) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let mut ptrs: Vec<*mut c_void> = tensors
            .iter_mut()
            .map(|t| t.as_mut_ptr() as *mut c_void)
            .collect();
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: as in all_reduce
        let rc = unsafe {
            distill_c10d_broadcast(
                self.raw,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                root as c_int,
                &mut err,
            )
        };
        self.check(rc, err, &format!("broadcast of {what}"))
    }

    pub fn barrier(&self, what: &str) -> Result<()> {
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: a live group
        let rc = unsafe { distill_c10d_barrier(self.raw, &mut err) };
        self.check(rc, err, &format!("barrier ({what})"))
    }

    /// Host values reduced across the ranks (f64; one collective).
    pub fn all_reduce_f64(&self, values: &[f64], op: ReduceOp, what: &str) -> Result<Vec<f64>> {
        let mut t = [Tensor::f_from_slice(values)?.f_to_device(self.device)?];
        self.all_reduce(&mut t, op, what)?;
        Ok(Vec::<f64>::try_from(t[0].f_to_device(tch::Device::Cpu)?)?)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by distill_c10d_new, freed once
        unsafe { distill_c10d_free(self.raw) };
    }
}
