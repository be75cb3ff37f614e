//! Why a bundle was refused or could not be written or unpacked: every variant names the member
//! (and inside the root filesystem, the entry) at fault.

use std::path::PathBuf;

use super::tar::TarError;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle: not a zstd stream: {0}")]
    Compression(String),
    #[error("bundle member {member}: {source}")]
    Tar { member: String, source: TarError },
    #[error(
        "bundle member {member}: SHA-256 {found}, the manifest expects {expected} (damaged bundle)"
    )]
    Digest {
        member: String,
        expected: String,
        found: String,
    },
    #[error("bundle member {member}: {what}")]
    Member { member: String, what: String },
    #[error("bundle manifest: {0}")]
    Manifest(String),
    #[error("bundle member {member}, entry {entry}: {what}")]
    Entry {
        member: String,
        entry: String,
        what: String,
    },
}

impl BundleError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BundleError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn member(member: &str, what: impl Into<String>) -> Self {
        BundleError::Member {
            member: member.to_string(),
            what: what.into(),
        }
    }
}
