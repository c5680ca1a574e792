//! The library's error type. Every variant names the file (and key, tensor or line) it is about, so
//! that the binary can print one clear line: `distill: <what>: <where>: <why>`.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are not what its format requires (truncated, bad magic, bad header).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A configuration value that is missing, of the wrong type, or not supported.
    #[error("{path}: key '{key}': {msg}")]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// A tensor argument whose shape or type does not fit.
    #[error("{0}")]
    Shape(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
    /// A collective of the distributed runtime failed or timed out (src/dist/): which rank, which
    /// operation, c10d's message.
    #[error("rank {rank}: {op}: {msg}")]
    Distributed {
        rank: usize,
        op: String,
        msg: String,
    },
    /// libtorch's message without the C++ stack it appends (deliberately not a `source`: error
    /// chains would print the stack again).
    #[error("libtorch: {}", torch_summary(.0))]
    Torch(tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// The first line of a libtorch error (its C++ frames follow "Exception raised from").
pub fn torch_summary(e: &tch::TchError) -> String {
    let text = e.to_string();
    let cut = text.find("\nException raised from").unwrap_or(text.len());
    text[..cut].lines().next().unwrap_or("").trim().to_string()
}
