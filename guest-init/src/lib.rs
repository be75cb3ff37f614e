//! The parts of openshell-init that other code links against: the DHCP packet handling (for the
//! fuzzer) and the boot clock it uses, and the k3s command line (for the tests that check what
//! a stand-in k3s was started with). Everything else lives in the binary.

pub mod clock;
pub mod dhcp;
#[path = "k3s/args.rs"]
pub mod k3s_args;
