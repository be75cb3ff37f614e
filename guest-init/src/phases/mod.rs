//! The boot plan: the phases, one module each, and the order they are listed in. A phase is a
//! named step with the phases it must run after (the contract is [`crate::engine::phase`]); the
//! engine, handed this plan by its caller, runs independent phases concurrently.

use crate::engine::phase::Phase;

pub mod capabilities;
pub mod channel;
pub mod config;
pub mod exec_service;
pub mod hostname;
pub mod k3s_prep;
pub mod kine;
pub mod loopback;
pub mod manifests;
pub mod mounts;
pub mod network;
pub mod network_cleanup;
pub mod pki;
pub mod runtime_cleanup;
pub mod state_disk;

/// The boot plan, in a valid order; the engine derives concurrency from `after`. On one CPU,
/// phases that are ready at the same time run in this order (a waiting phase such as `network`
/// starts on its own thread as soon as it is ready): `channel` last, because once connected the
/// boot channel sends its backlog from a thread that would compete with the phases after it.
pub const PLAN: &[&Phase] = &[
    &mounts::PHASE,
    &config::PHASE,
    &exec_service::PHASE,
    &state_disk::PHASE,
    &manifests::PHASE,
    &pki::PHASE,
    &runtime_cleanup::PHASE,
    &network_cleanup::PHASE,
    &kine::PHASE,
    &capabilities::PHASE,
    &hostname::PHASE,
    &loopback::PHASE,
    &network::PHASE,
    &k3s_prep::PHASE,
    &channel::PHASE,
];

/// The phase of the plan called `name`, for running one phase alone (`openshell-init phase`).
pub fn find(name: &str) -> Option<&'static Phase> {
    PLAN.iter().copied().find(|p| p.name == name)
}
