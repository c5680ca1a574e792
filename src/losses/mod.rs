//! Distillation losses (see issue 3).
