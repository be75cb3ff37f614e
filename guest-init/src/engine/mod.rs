//! The phase engine: runs the plan its caller hands it, each phase once the phases it runs after
//! are done, on threads where that pays. Reports start and finish of every phase. What a phase
//! is lives in [`phase`]; which phases there are is the caller's business (`crate::phases`).

pub mod phase;

// BTreeSet, not HashSet: a dozen names need no hashing, and a HashSet's random keys cost PID 1 a
// getrandom call and SipHash code to translate at boot under emulation.
use std::collections::BTreeSet;

use openshell_shared::{GuestMessage, Outcome};

use crate::context::Ctx;
use openshell_init::clock::Stopwatch;
use phase::{Done, Phase};

/// A fatal phase failed: boot cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("phase {phase} failed: {error}")]
pub struct Fatal {
    pub phase: &'static str,
    pub error: String,
}

/// Orders `plan` into waves. Errors name a phase whose dependency is missing or cyclic.
pub fn waves<'a>(plan: &[&'a Phase]) -> Result<Vec<Vec<&'a Phase>>, String> {
    let names: BTreeSet<&str> = plan.iter().map(|p| p.name).collect();
    for p in plan {
        if let Some(missing) = p.after.iter().find(|d| !names.contains(*d)) {
            return Err(format!(
                "phase {} runs after unknown phase {missing}",
                p.name
            ));
        }
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
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

/// More than one CPU to run on. Asked of the scheduler directly: std's `available_parallelism`
/// also looks for cgroup quotas under /proc, which PID 1 reaches before /proc is mounted
/// (round trips to the host over virtio-fs for files that are not there).
fn parallel() -> bool {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
                .nth(1)
                .is_some()
        })
        .unwrap_or(false)
}

/// Runs the plan, starting each phase as soon as the phases it runs after are done (not wave by
/// wave: a phase that waits on the network should not wait for unrelated phases first).
/// Non-fatal failures are reported and boot goes on; after the first fatal one nothing new
/// starts, phases already running finish, and the failure is returned.
///
/// With more than one CPU every phase gets a thread. On one vCPU under emulation a thread's
/// creation costs more than the phases it would overlap, so only phases that wait (`waits`) get
/// one, and the rest run inline in plan order.
pub fn run(ctx: &Ctx, plan: &[&'static Phase]) -> Result<(), Fatal> {
    waves(plan).map_err(|error| Fatal {
        phase: "plan",
        error,
    })?;
    let threaded = parallel();
    let mut progress = Progress::default();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<(&'static Phase, Option<String>)>();
        let mut running = 0usize;
        loop {
            while let Ok((phase, failure)) = rx.try_recv() {
                running -= 1;
                progress.finish(phase, failure);
            }
            if progress.fatal.is_none() {
                // Threads first, so their waits overlap the inline phases' work.
                let spawn: Vec<&'static Phase> = plan
                    .iter()
                    .copied()
                    .filter(|p| progress.ready(p) && (threaded || p.waits))
                    .collect();
                for phase in spawn {
                    progress.started.insert(phase.name);
                    running += 1;
                    let tx = tx.clone();
                    s.spawn(move || {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run_one(ctx, phase)
                        }))
                        .unwrap_or_else(|_| Some("phase panicked".to_string()));
                        let _ = tx.send((phase, result));
                    });
                }
                if let Some(phase) = plan.iter().copied().find(|p| progress.ready(p)) {
                    progress.started.insert(phase.name);
                    let failure = run_one(ctx, phase);
                    progress.finish(phase, failure);
                    continue;
                }
            }
            if running == 0 {
                break;
            }
            match rx.recv() {
                Ok((phase, failure)) => {
                    running -= 1;
                    progress.finish(phase, failure);
                }
                Err(_) => break,
            }
        }
    });
    match progress.fatal {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Where a run of the plan stands.
#[derive(Default)]
struct Progress {
    started: BTreeSet<&'static str>,
    done: BTreeSet<&'static str>,
    /// The first fatal failure.
    fatal: Option<Fatal>,
}

impl Progress {
    fn ready(&self, p: &Phase) -> bool {
        !self.started.contains(p.name) && p.after.iter().all(|d| self.done.contains(d))
    }

    fn finish(&mut self, phase: &'static Phase, failure: Option<String>) {
        self.done.insert(phase.name);
        if let (true, Some(error), None) = (phase.fatal, failure, &self.fatal) {
            self.fatal = Some(Fatal {
                phase: phase.name,
                error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::phase::PhaseResult;
    use super::*;
    use crate::reporter::{Reporter, Sink};
    use std::sync::Mutex;

    /// A thread allowed on one CPU sees one; on a machine with more, an unpinned one sees more.
    #[test]
    fn parallel_follows_the_cpus_this_thread_may_use() {
        let (pinned, unpinned) = std::thread::spawn(|| {
            let before = parallel();
            let mut one = nix::sched::CpuSet::new();
            let cpu = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
                .ok()
                .and_then(|s| {
                    (0..nix::sched::CpuSet::count()).find(|&c| s.is_set(c).unwrap_or(false))
                })
                .expect("some cpu");
            one.set(cpu).expect("set");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin");
            (parallel(), before)
        })
        .join()
        .expect("thread");
        assert!(!pinned, "one CPU allowed, yet parallel");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus > 1 {
            assert!(unpinned, "{cpus} CPUs, yet not parallel");
        }
    }

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
    /// Records `+name` on entry and `name` on return, 50 ms apart: whether two phases ran at
    /// once is then read from the order of the records, not from a clock a loaded machine skews.
    fn slow(name: &'static str, start: &'static str, ms: u64) -> PhaseResult {
        record(start)?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        record(name)
    }
    fn b(_: &Ctx) -> PhaseResult {
        slow("b", "+b", 50)
    }
    fn c(_: &Ctx) -> PhaseResult {
        slow("c", "+c", 50)
    }
    fn d_slow(_: &Ctx) -> PhaseResult {
        slow("d", "+d", 50)
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
        // b and c sleep 50 ms each: each starts before the other ends.
        let order = ordered_run(&[&A, &B, &C, &D]);
        assert_overlap(&order, "b", "c");
        assert_eq!(order.first(), Some(&"a"));
        assert_eq!(order.last(), Some(&"d"));
    }

    /// Runs `plan`, returning the order phases recorded themselves in.
    fn ordered_run(plan: &[&'static Phase]) -> Vec<&'static str> {
        ORDER.lock().expect("order").clear();
        run(&ctx(), plan).expect("runs");
        let order = ORDER.lock().expect("order").clone();
        order
    }

    fn at(order: &[&str], what: &str) -> usize {
        order
            .iter()
            .position(|r| *r == what)
            .unwrap_or_else(|| panic!("no {what} in {order:?}"))
    }

    /// `x` and `y` (recorded by [`slow`]) ran at once: each started before the other ended.
    fn assert_overlap(order: &[&str], x: &str, y: &str) {
        let (sx, sy) = (format!("+{x}"), format!("+{y}"));
        assert!(
            at(order, &sx) < at(order, y) && at(order, &sy) < at(order, x),
            "{x} and {y} ran one after the other: {order:?}"
        );
    }

    /// One CPU for this thread (and the threads it starts), as in a 1-vCPU guest.
    fn pin_to_one_cpu() {
        let mut one = nix::sched::CpuSet::new();
        one.set(0).expect("cpu 0");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("affinity");
        assert!(!parallel(), "pinned to one CPU");
    }

    /// Whatever the CPU count, a waiting phase does not hold up the rest of its wave: b runs
    /// while c waits.
    #[test]
    fn a_waiting_phase_overlaps_its_wave() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        pin_to_one_cpu();
        let order = ordered_run(&[&A, &B, &C_WAITS, &D]);
        assert_overlap(&order, "b", "c");
        assert_eq!(order.first(), Some(&"a"));
        assert_eq!(order.last(), Some(&"d"));
    }

    fn long_wait(_: &Ctx) -> PhaseResult {
        slow("w", "+w", 100)
    }
    /// Waits 100 ms, after b only.
    const W: Phase = Phase {
        name: "w",
        after: &["b"],
        fatal: true,
        waits: true,
        purpose: "",
        run: long_wait,
    };
    const D_AFTER_C: Phase = Phase {
        name: "d",
        after: &["c"],
        fatal: true,
        waits: false,
        purpose: "",
        run: d_slow,
    };

    /// A waiting phase starts the moment its own dependencies are done: w (after b) starts while
    /// c, its wave's other phase, still runs. Run wave by wave (b and c, then w beside d) it
    /// would start only after c ended.
    #[test]
    fn a_waiting_phase_starts_as_soon_as_it_can() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        pin_to_one_cpu();
        let order = ordered_run(&[&A, &B, &C, &D_AFTER_C, &W]);
        assert!(at(&order, "b") < at(&order, "+w"), "{order:?}");
        assert_overlap(&order, "w", "c");
        assert_overlap(&order, "w", "d");
    }

    #[test]
    fn fatal_failure_stops_the_plan_but_soft_one_does_not() {
        let err = run(&ctx(), &[&SOFT, &HARD, &AFTER_HARD]).unwrap_err();
        assert_eq!(err.phase, "hard");
        assert_eq!(err.error, "boom");
        assert!(!AFTER_HARD_RAN.load(std::sync::atomic::Ordering::SeqCst));
    }
}
