//! Test data this crate shares with the VM tests crate, compiled in from there so that the
//! workspace holds one copy: a gateway's root as a crash leaves it (for `bench state`) and the
//! kine database in it (for `bench kine` too).

#[path = "../../tests/src/crashed_root.rs"]
pub mod crashed_root;
