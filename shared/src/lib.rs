//! Types both sides of the gateway VM agree on: the boot channel protocol spoken over vsock, the
//! exec service protocol, and the boot configuration openshell-init reads. Kept free of I/O so the host, the guest and the
//! fuzzers all use the exact same decoding code.

pub mod arch;
pub mod config;
pub mod exec;
pub mod framing;
pub mod fsutil;
pub mod protocol;

pub use arch::Arch;
pub use config::{BootConfig, Cmdline, ConfigError};
pub use protocol::{
    encode, Envelope, FrameDecoder, GuestMessage, HostMessage, Level, Outcome, ProtocolError,
    StreamValidator, BOOT_CHANNEL_PORT, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
