//! Test hooks for the fault tests (non-finite steps, a kill mid-step or mid-save), read from the
//! environment. Compiled only with the `fault-injection` feature (the test command enables it); in
//! the default build every hook is a no-op and no variable is read.
//!   DISTILL_FAULT_NAN_STEPS=3,7       poison those steps' loss (×NaN)
//!   DISTILL_FAULT_STEP_DELAY_MS=40    sleep after every step
//!   DISTILL_FAULT_SLOW_SAVE_MS=1500   sleep in the middle of a checkpoint save
//!   DISTILL_FAULT_DIE_AFTER_STEP=12   SIGKILL the run once step 12 is done (its checkpoint written)
//!   DISTILL_FAULT_DIE_ENTERING_STAGE=2  SIGKILL the run once stage 2's cut is made and recorded,
//!                                     before its first step
#[derive(Debug, Default, Clone)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    nan_steps: Vec<usize>,
    #[cfg(feature = "fault-injection")]
    step_delay: Option<std::time::Duration>,
    #[cfg(feature = "fault-injection")]
    save_delay: Option<std::time::Duration>,
    #[cfg(feature = "fault-injection")]
    die_after_step: Option<usize>,
    #[cfg(feature = "fault-injection")]
    die_entering_stage: Option<usize>,
}

impl Faults {
    #[cfg(feature = "fault-injection")]
    pub fn from_env() -> Self {
        let ms = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis)
        };
        Faults {
            nan_steps: std::env::var("DISTILL_FAULT_NAN_STEPS")
                .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_default(),
            step_delay: ms("DISTILL_FAULT_STEP_DELAY_MS"),
            save_delay: ms("DISTILL_FAULT_SLOW_SAVE_MS"),
            die_after_step: std::env::var("DISTILL_FAULT_DIE_AFTER_STEP")
                .ok()
                .and_then(|v| v.parse().ok()),
            die_entering_stage: std::env::var("DISTILL_FAULT_DIE_ENTERING_STAGE")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn from_env() -> Self {
        Faults::default()
    }

    /// Whether step `step`'s loss is to be poisoned.
    pub fn poison(&self, _step: usize) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.nan_steps.contains(&_step);
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    /// After step `step` is done (logged, evaluated, checkpointed).
    pub fn after_step(&self, _step: usize) {
        #[cfg(feature = "fault-injection")]
        {
            if let Some(d) = self.step_delay {
                std::thread::sleep(d);
            }
            if self.die_after_step == Some(_step) {
                die();
            }
        }
    }

    /// After stage `stage`'s cut is made and recorded, before its first step.
    pub fn entered_stage(&self, _stage: usize) {
        #[cfg(feature = "fault-injection")]
        if self.die_entering_stage == Some(_stage) {
            die();
        }
    }

    pub fn during_save(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.save_delay {
            std::thread::sleep(d);
        }
    }
}

/// SIGKILL this process: nothing runs after it (no destructor, no flush), as in a real kill.
#[cfg(feature = "fault-injection")]
fn die() {
    // SAFETY: sends SIGKILL to this process; nothing runs after it
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
