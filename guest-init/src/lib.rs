//! The parts of openshell-init that other code links against: the DHCP packet handling (for the
//! fuzzer) and the boot clock it uses. Everything else lives in the binary.

pub mod clock;
pub mod dhcp;
