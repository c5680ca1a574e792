//! Who this process is among several, from the variables torchrun (and SLURM launches that set
//! them, and `distill launch`) give every process:
//!   WORLD_SIZE   the number of processes (absent or 1: one process, no group)
//!   RANK         this process's rank in [0, WORLD_SIZE)
//!   LOCAL_RANK   its rank on this machine (the CUDA device it takes); default RANK
//!   MASTER_ADDR, MASTER_PORT   where the TCPStore rendezvous is (rank 0 hosts it, or torchrun's
//!                agent when TORCHELASTIC_USE_AGENT_STORE=True; then keys are prefixed by the
//!                restart count, TORCHELASTIC_RESTART_COUNT, as torch.distributed does)
//!   DISTILL_DIST_TIMEOUT   seconds a rendezvous or collective may wait (default 600): a rank that
//!                is gone makes the others fail with one error within it, never hang
use super::c10d::{self, Backend, ProcessGroup, Rendezvous};
use crate::{Error, Result};
use std::time::Duration;
use tch::Device;

pub const DEFAULT_TIMEOUT_S: f64 = 600.0;

/// The variables, read and checked (a bad value names the variable).
#[derive(Debug, Clone, PartialEq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub host: String,
    pub port: u16,
    pub agent_store: bool,
    pub restart: usize,
    pub timeout: Duration,
}

fn bad(var: &str, value: &str, why: &str) -> Error {
    Error::Invalid(format!("environment variable {var}={value:?}: {why}"))
}

fn number<T: std::str::FromStr>(
    var: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<T>> {
    match get(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(var, &v, "not a non-negative integer")),
    }
}

impl WorldEnv {
    /// From the process's environment; None for one process.
    pub fn from_env() -> Result<Option<WorldEnv>> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    /// From any source of variables (tests pass a map).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
        let Some(world) = number::<usize>("WORLD_SIZE", get)? else {
            return Ok(None);
        };
        if world == 0 {
            return Err(bad("WORLD_SIZE", "0", "must be at least 1"));
        }
        if world == 1 {
            return Ok(None);
        }
        let rank = number::<usize>("RANK", get)?
            .ok_or_else(|| bad("RANK", "", "missing (WORLD_SIZE is set)"))?;
        if rank >= world {
            return Err(bad(
                "RANK",
                &rank.to_string(),
                &format!("must be below WORLD_SIZE={world}"),
            ));
        }
        let local_rank = number::<usize>("LOCAL_RANK", get)?.unwrap_or(rank);
        let host = get("MASTER_ADDR")
            .filter(|h| !h.trim().is_empty())
            .ok_or_else(|| bad("MASTER_ADDR", "", "missing (WORLD_SIZE is set)"))?;
        let port = number::<u16>("MASTER_PORT", get)?
            .ok_or_else(|| bad("MASTER_PORT", "", "missing (WORLD_SIZE is set)"))?;
        let timeout = match get("DISTILL_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT_S,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 86_400.0 => s,
                _ => return Err(bad("DISTILL_DIST_TIMEOUT", &v, "seconds in (0, 86400]")),
            },
        };
        Ok(Some(WorldEnv {
            rank,
            world,
            local_rank,
            host: host.trim().to_string(),
            port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            restart: number::<usize>("TORCHELASTIC_RESTART_COUNT", get)?.unwrap_or(0),
            timeout: Duration::from_secs_f64(timeout),
        }))
    }
}

/// This process's place: one process (no group), or a rank of a process group.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub group: Option<ProcessGroup>,
}

impl World {
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            group: None,
        }
    }

    /// The device a rank computes on: with several processes a CUDA device becomes
    /// `cuda:LOCAL_RANK` (one GPU per process, as torchrun's convention); the CPU stays.
    pub fn device_for(env: &WorldEnv, device: Device) -> Device {
        match device {
            Device::Cuda(_) => Device::Cuda(env.local_rank),
            d => d,
        }
    }

    /// Meet the other ranks: Gloo for the CPU, NCCL for CUDA when the build has it (else Gloo,
    /// which also reduces CUDA tensors, through host copies).
    pub fn join(env: &WorldEnv, device: Device) -> Result<World> {
        let backend = match device {
            Device::Cuda(_) if c10d::has_nccl() => Backend::Nccl,
            _ => Backend::Gloo,
        };
        let group = ProcessGroup::new(&Rendezvous {
            host: env.host.clone(),
            port: env.port,
            rank: env.rank,
            world: env.world,
            timeout: env.timeout,
            agent_store: env.agent_store,
            prefix: if env.agent_store {
                format!("/worker/attempt_{}", env.restart)
            } else {
                String::new()
            },
            backend,
            device: match backend {
                Backend::Nccl => device,
                Backend::Gloo => Device::Cpu,
            },
        })?;
        Ok(World {
            rank: env.rank,
            size: env.world,
            local_rank: env.local_rank,
            group: Some(group),
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<WorldEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldEnv::from_vars(&|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let w = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.world, w.local_rank, w.port), (3, 4, 1, 29500));
        assert_eq!(
            (w.host.as_str(), w.agent_store, w.restart),
            ("node0", true, 2)
        );
        assert_eq!(w.timeout, Duration::from_secs(600));
        for (pairs, var) in [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (vec![("WORLD_SIZE", "x")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0")], "MASTER_ADDR"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "MASTER_PORT",
            ),
        ] {
            let e = env(&pairs).unwrap_err().to_string();
            assert!(e.contains(var), "{e} should name {var}");
        }
    }
}
