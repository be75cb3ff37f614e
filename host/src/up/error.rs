//! Why `up` could not start or follow a boot: each variant names the file, socket or program
//! involved. All of them end `up` with [`code::SETUP`].

use std::path::PathBuf;

use super::args::code;
use crate::backend::libkrun::LibkrunError;
use crate::channel::ChannelError;
use crate::children::ChildError;
use crate::failure::Failure;
use crate::lifecycle::reset::ResetError;
use crate::lifecycle::state::StateError;
use crate::lifecycle::state_disk::StateDiskError;
use crate::net::choice::NetChoiceError;
use crate::net::gvproxy::ExposeError;
use crate::net::passt::PasstDirError;
use crate::net::ForwardError;
use crate::rundir::RunDirError;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::HostBundleError),
    #[error("kernel {0} does not exist")]
    NoKernel(PathBuf),
    #[error("root filesystem {0} is not a directory")]
    NoRootfs(PathBuf),
    #[error("root filesystem: {0}; as root, a guest's setuid files would be root's there: close a directory above it to others (chmod 700)")]
    OpenRootfs(crate::private_dir::DirError),
    #[error(transparent)]
    Net(#[from] NetChoiceError),
    #[error(transparent)]
    Passt(#[from] PasstDirError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Expose(#[from] ExposeError),
    #[error("--host-port: {0}")]
    HostPorts(String),
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::errno::Errno),
    #[error(transparent)]
    Libkrun(#[from] LibkrunError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("--accel kvm: {0}")]
    Accel(#[from] crate::backend::kvm::HypervisorError),
    #[error(transparent)]
    Sizing(#[from] crate::sizing::ManifestError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Reset(#[from] ResetError),
    #[error(transparent)]
    StateDisk(#[from] StateDiskError),
}

impl Failure for UpError {
    fn exit_code(&self) -> i32 {
        code::SETUP
    }
}
