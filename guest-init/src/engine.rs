//! The phase engine: runs a plan in waves, each wave being the phases whose dependencies are all
//! done, concurrently when a wave holds more than one. Reports start and finish of every phase.

use std::collections::HashSet;

use openshell_shared::{GuestMessage, Outcome};

use crate::clock::Stopwatch;
use crate::phases::{Ctx, Done, Phase};

/// A fatal phase failed: boot cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("phase {phase} failed: {error}")]
pub struct Fatal {
    pub phase: &'static str,
    pub error: String,
}

/// Orders `plan` into waves. Errors name a phase whose dependency is missing or cyclic.
pub fn waves<'a>(plan: &[&'a Phase]) -> Result<Vec<Vec<&'a Phase>>, String> {
    let names: HashSet<&str> = plan.iter().map(|p| p.name).collect();
    for p in plan {
        if let Some(missing) = p.after.iter().find(|d| !names.contains(*d)) {
            return Err(format!(
                "phase {} runs after unknown phase {missing}",
                p.name
            ));
        }
    }
    let mut done: HashSet<&str> = HashSet::new();
    let mut left: Vec<&Phase> = plan.to_vec();
    let mut out = Vec::new();
    while !left.is_empty() {
        let (ready, rest): (Vec<&Phase>, Vec<&Phase>) = left
            .into_iter()
            .partition(|p| p.after.iter().all(|d| done.contains(d)));
        if ready.is_empty() {
            let stuck: Vec<_> = rest.iter().map(|p| p.name).collect();
            return Err(format!("dependency cycle among phases {stuck:?}"));
        }
        done.extend(ready.iter().map(|p| p.name));
        out.push(ready);
        left = rest;
    }
    Ok(out)
}

/// Runs one phase and reports it. Returns the failure text, if any.
pub fn run_one(ctx: &Ctx, phase: &Phase) -> Option<String> {
    ctx.reporter.emit(GuestMessage::PhaseStarted {
        phase: phase.name.to_string(),
    });
    let watch = Stopwatch::start();
    let result = (phase.run)(ctx);
    let duration_us = watch.elapsed_us();
    let (outcome, failure) = match result {
        Ok(Done::Ok(detail)) => {
            if let Some(text) = detail {
                ctx.reporter.log(
                    openshell_shared::Level::Info,
                    format!("{}: {text}", phase.name),
                );
            }
            (Outcome::Ok, None)
        }
        Ok(Done::Skipped(why)) => (Outcome::Skipped(why), None),
        Err(e) => {
            let text = e.to_string();
            (Outcome::Failed(text.clone()), Some(text))
        }
    };
    ctx.reporter
        .phase_finished(phase.name, duration_us, outcome);
    failure
}

fn parallel() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// Runs the plan. Non-fatal failures are reported and boot goes on; the first fatal one stops
/// the plan after its wave.
pub fn run(ctx: &Ctx, plan: &[&'static Phase]) -> Result<(), Fatal> {
    let waves = waves(plan).map_err(|error| Fatal {
        phase: "plan",
        error,
    })?;
    for wave in waves {
        // Threads only pay with a second CPU to run them on: on one vCPU under emulation, a
        // thread's creation costs more than the phases it would overlap.
        let threaded = wave.len() > 1 && parallel();
        let failures: Vec<(&'static Phase, Option<String>)> =
            if wave.len() == 1 || !wave.iter().any(|p| threaded || p.waits) {
                wave.iter().map(|p| (*p, run_one(ctx, p))).collect()
            } else {
                std::thread::scope(|s| {
                    // Threads first, so a waiting phase's wait overlaps the inline ones' work.
                    let handles: Vec<_> = wave
                        .iter()
                        .filter(|p| threaded || p.waits)
                        .map(|p| (*p, s.spawn(move || run_one(ctx, p))))
                        .collect();
                    let mut results: Vec<_> = wave
                        .iter()
                        .filter(|p| !(threaded || p.waits))
                        .map(|p| (*p, run_one(ctx, p)))
                        .collect();
                    results.extend(handles.into_iter().map(|(p, h)| {
                        let r = h
                            .join()
                            .unwrap_or_else(|_| Some("phase panicked".to_string()));
                        (p, r)
                    }));
                    results
                })
            };
        if let Some((phase, Some(error))) =
            failures.into_iter().find(|(p, f)| p.fatal && f.is_some())
        {
            return Err(Fatal {
                phase: phase.name,
                error,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phases::PhaseResult;
    use crate::reporter::{Reporter, Sink};
    use std::sync::Mutex;

    static ORDER: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    /// The tests that read ORDER run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn record(name: &'static str) -> PhaseResult {
        ORDER.lock().expect("order").push(name);
        Ok(Done::Ok(None))
    }
    fn a(_: &Ctx) -> PhaseResult {
        record("a")
    }
    fn b(_: &Ctx) -> PhaseResult {
        std::thread::sleep(std::time::Duration::from_millis(50));
        record("b")
    }
    fn c(_: &Ctx) -> PhaseResult {
        std::thread::sleep(std::time::Duration::from_millis(50));
        record("c")
    }
    fn d(_: &Ctx) -> PhaseResult {
        record("d")
    }
    static AFTER_HARD_RAN: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    fn after_hard(_: &Ctx) -> PhaseResult {
        AFTER_HARD_RAN.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Done::Ok(None))
    }
    fn boom(_: &Ctx) -> PhaseResult {
        Err("boom".into())
    }

    const A: Phase = Phase {
        name: "a",
        after: &[],
        fatal: true,
        waits: false,
        purpose: "",
        run: a,
    };
    const B: Phase = Phase {
        name: "b",
        after: &["a"],
        fatal: true,
        waits: false,
        purpose: "",
        run: b,
    };
    const C: Phase = Phase {
        name: "c",
        after: &["a"],
        fatal: true,
        waits: false,
        purpose: "",
        run: c,
    };
    const D: Phase = Phase {
        name: "d",
        after: &["b", "c"],
        fatal: true,
        waits: false,
        purpose: "",
        run: d,
    };
    const SOFT: Phase = Phase {
        name: "soft",
        after: &[],
        fatal: false,
        waits: false,
        purpose: "",
        run: boom,
    };
    const HARD: Phase = Phase {
        name: "hard",
        after: &["soft"],
        fatal: true,
        waits: false,
        purpose: "",
        run: boom,
    };
    const AFTER_HARD: Phase = Phase {
        name: "after",
        after: &["hard"],
        fatal: true,
        waits: false,
        purpose: "",
        run: after_hard,
    };

    /// Like `c`, but declared as waiting: it sleeps 50 ms outside the CPU.
    const C_WAITS: Phase = Phase {
        name: "c",
        after: &["a"],
        fatal: true,
        waits: true,
        purpose: "",
        run: c,
    };

    fn ctx() -> Ctx {
        let r = Reporter::new(Sink::Console, 0);
        r.disable_channel();
        Ctx::new(std::path::Path::new("/nonexistent"), r, false)
    }

    #[test]
    fn waves_follow_dependencies() {
        let w = waves(&[&D, &C, &B, &A]).expect("valid");
        let names: Vec<Vec<&str>> = w
            .iter()
            .map(|w| w.iter().map(|p| p.name).collect())
            .collect();
        assert_eq!(names, vec![vec!["a"], vec!["c", "b"], vec!["d"]]);
    }

    #[test]
    fn unknown_and_cyclic_dependencies_are_named() {
        const X: Phase = Phase {
            name: "x",
            after: &["y"],
            fatal: true,
            waits: false,
            purpose: "",
            run: a,
        };
        const Y: Phase = Phase {
            name: "y",
            after: &["x"],
            fatal: true,
            waits: false,
            purpose: "",
            run: a,
        };
        assert!(waves(&[&X]).unwrap_err().contains("unknown phase y"));
        assert!(waves(&[&X, &Y]).unwrap_err().contains("cycle"));
    }

    #[test]
    fn independent_phases_run_concurrently() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        if !parallel() {
            eprintln!("skipped: one CPU, the engine runs phases in sequence");
            return;
        }
        ORDER.lock().expect("order").clear();
        let watch = Stopwatch::start();
        run(&ctx(), &[&A, &B, &C, &D]).expect("runs");
        // b and c sleep 50 ms each; run one after the other they would take 100 ms.
        assert!(
            watch.elapsed_us() < 95_000,
            "took {} us",
            watch.elapsed_us()
        );
        let order = ORDER.lock().expect("order").clone();
        assert_eq!(order.first(), Some(&"a"));
        assert_eq!(order.last(), Some(&"d"));
    }

    /// Whatever the CPU count, a waiting phase does not hold up the rest of its wave: b and c
    /// sleep 50 ms each, in sequence they would take 100 ms.
    #[test]
    fn a_waiting_phase_overlaps_its_wave() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        // One CPU for this thread (and the threads it starts), as in a 1-vCPU guest.
        let mut one = nix::sched::CpuSet::new();
        one.set(0).expect("cpu 0");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("affinity");
        assert!(!parallel(), "pinned to one CPU");
        ORDER.lock().expect("order").clear();
        let watch = Stopwatch::start();
        run(&ctx(), &[&A, &B, &C_WAITS, &D]).expect("runs");
        assert!(
            watch.elapsed_us() < 95_000,
            "took {} us",
            watch.elapsed_us()
        );
        let order = ORDER.lock().expect("order").clone();
        assert_eq!(order.first(), Some(&"a"));
        assert_eq!(order.last(), Some(&"d"));
    }

    #[test]
    fn fatal_failure_stops_the_plan_but_soft_one_does_not() {
        let err = run(&ctx(), &[&SOFT, &HARD, &AFTER_HARD]).unwrap_err();
        assert_eq!(err.phase, "hard");
        assert_eq!(err.error, "boom");
        assert!(!AFTER_HARD_RAN.load(std::sync::atomic::Ordering::SeqCst));
    }
}
