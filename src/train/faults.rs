//! Test hooks for the fault tests (non-finite steps, a kill mid-step or mid-save), read from the
//! environment. Compiled only with the `fault-injection` feature (the test command enables it); in
//! the default build every hook is a no-op and no variable is read.
//!   DISTILL_FAULT_NAN_STEPS=3,7       poison those steps' loss (×NaN)
//!   DISTILL_FAULT_STEP_DELAY_MS=40    sleep after every step
//!   DISTILL_FAULT_SLOW_SAVE_MS=1500   sleep in the middle of a checkpoint save
#[derive(Debug, Default, Clone)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    nan_steps: Vec<usize>,
    #[cfg(feature = "fault-injection")]
    step_delay: Option<std::time::Duration>,
    #[cfg(feature = "fault-injection")]
    save_delay: Option<std::time::Duration>,
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

    pub fn after_step(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.step_delay {
            std::thread::sleep(d);
        }
    }

    pub fn during_save(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.save_delay {
            std::thread::sleep(d);
        }
    }
}
