//! The error every xtask command returns: a failed file operation with the path it was on, or a
//! message that already says what failed and where.

use std::path::{Path, PathBuf};

use crate::fixtures::crashed_root::SeedError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn msg(text: impl Into<String>) -> Self {
        Error::Msg(text.into())
    }
}

/// The crashed-root builder's error (it is shared with the VM tests, so has its own type): the
/// same operation on the same path.
impl From<SeedError> for Error {
    fn from(e: SeedError) -> Self {
        Error::io(e.what, &e.path, e.source)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
