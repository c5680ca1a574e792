//! Where and in what precision the models compute, decided once at the top of a command
//! (`[run] device`, `--device`, `[teacher] dtype`, `[student] dtype`) and handed down.
use crate::{Error, Result};
use tch::{Device, Kind};

/// "cpu", "cuda" (the first GPU) or "cuda:N".
pub fn parse_device(s: &str) -> std::result::Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!("'{s}' is not one of cpu, cuda, cuda:N")),
        },
    }
}

/// The device's name as the run file spells it.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Refuse a device this process cannot use, with one clear line.
pub fn check_available(d: Device) -> Result<()> {
    match d {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => {
            let count = if tch::Cuda::is_available() {
                tch::Cuda::device_count() as usize
            } else {
                0
            };
            if count == 0 {
                Err(Error::Invalid(format!(
                    "device {}: CUDA is not available here (libtorch sees no GPU); use device = \"cpu\"",
                    device_name(d)
                )))
            } else if n >= count {
                Err(Error::Invalid(format!(
                    "device {}: this machine has {count} CUDA device(s), cuda:0..cuda:{}",
                    device_name(d),
                    count - 1
                )))
            } else {
                Ok(())
            }
        }
        other => Err(Error::Invalid(format!("device {other:?} is not supported"))),
    }
}

/// A compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn parse(s: &str) -> std::result::Result<Dtype, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            other => Err(format!("'{other}' is not one of f32, bf16, f16")),
        }
    }
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}
