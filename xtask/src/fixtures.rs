//! Test data and peers this crate shares with the tests of the other crates, compiled in from
//! there so that the workspace holds one copy: a gateway's root as a crash leaves it (for
//! `bench state`) and the kine database in it (for `bench kine` too); real kine driven through
//! etcdctl (for `bench kine` and the pre-initialised root's test).

// Its query helper is for the VM tests.
#[allow(dead_code)]
#[path = "../../tests/src/crashed_root.rs"]
pub mod crashed_root;

// Not every helper of the shared driver is used here.
#[allow(dead_code)]
#[path = "../../guest-init/tests/support/kine_peer.rs"]
pub mod kine_peer;
