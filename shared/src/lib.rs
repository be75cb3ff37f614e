//! What both sides of the gateway VM agree on: the boot channel protocol spoken over vsock, the
//! exec service protocol, the boot configuration openshell-init reads, and the one way both
//! replace a file atomically (`fsutil`). The protocol decoders do no I/O of their own (they
//! decode bytes they are given), so the host, the guest and the fuzzers run the exact same
//! decoding code; `config` reads its one file, `fsutil` writes files. `cache` says where the
//! artifact cache is, for `cargo xtask` that fills it and the host that finds gvproxy there;
//! `sizing` the VM's vCPUs and memory as a root's manifest records them.
//! `bundle` (feature `bundle`) is the file xtask writes and the host boots from.

pub mod arch;
#[cfg(feature = "bundle")]
pub mod bundle;
pub mod cache;
pub mod config;
pub mod exec;
pub mod framing;
pub mod fsutil;
pub mod protocol;
pub mod sizing;

pub use arch::Arch;
pub use config::{BootConfig, Cmdline, ConfigError};
pub use protocol::{
    encode, Envelope, FrameDecoder, GuestMessage, HostMessage, Level, Outcome, ProtocolError,
    StreamValidator, BOOT_CHANNEL_PORT, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
