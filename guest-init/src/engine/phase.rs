//! The contract between the engine and the phases: what a phase declares about itself and how
//! it reports its end. Phases implement it; the engine runs whatever plan it is handed.

use crate::context::Ctx;

/// How a phase that did not fail ended, with an optional one-line account of what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Ok(Option<String>),
    Skipped(String),
}

pub type PhaseError = Box<dyn std::error::Error + Send + Sync>;
pub type PhaseResult = Result<Done, PhaseError>;

pub struct Phase {
    pub name: &'static str,
    pub after: &'static [&'static str],
    /// A failure stops the boot (nothing after it can work) instead of being reported and
    /// carried past.
    pub fatal: bool,
    /// Spends its time waiting on the world outside the guest's CPU (a DHCP server): on one CPU
    /// it runs on a thread of its own while the rest of its wave runs inline.
    pub waits: bool,
    pub purpose: &'static str,
    pub run: fn(&Ctx) -> PhaseResult,
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phase")
            .field("name", &self.name)
            .field("after", &self.after)
            .field("fatal", &self.fatal)
            .finish()
    }
}
