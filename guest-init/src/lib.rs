//! The parts of openshell-init that other code links against: the DHCP packet handling (for the
//! fuzzer) and the boot clock it uses, the k3s command line (for the tests that check what a
//! stand-in k3s was started with), and where a guest path lives under a root (for the tests that
//! build a root). Everything else lives in the binary.

pub mod clock;
pub mod dhcp;
pub mod guest_path;
#[path = "k3s/args.rs"]
pub mod k3s_args;
