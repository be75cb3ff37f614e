//! What one `up` run holds and must give back: the instance (its lock and state directory, the
//! state disk's lock), the run directory, the helper processes, and the state file as last
//! written. Claimed first, closed last on every way out.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::args::UpArgs;
use super::error::UpError;
use crate::children::Helper;
use crate::lifecycle::reset;
use crate::lifecycle::state::{InstanceLock, InstanceState, StateDir};
use crate::lifecycle::state_disk::{self, DiskLock};
use crate::progress::Progress;
use crate::report::Timeline;
use crate::rundir::RunDir;

/// Processes this run started, stopped in reverse order on every way out.
#[derive(Default)]
pub struct Session {
    pub helpers: Vec<Helper>,
    pub run_dir: Option<RunDir>,
    /// Held for the whole run: a second `up` of the instance fails while it is.
    pub lock: Option<InstanceLock>,
    /// Held for the whole run when the VM gets the state disk (the VMM inherits it).
    pub disk_lock: Option<DiskLock>,
    pub state: Option<StateDir>,
    /// Held for the whole run: no `--reset` of this root while the VM uses it.
    pub root: Option<reset::RootLock>,
    /// The state file as last written, updated as ready stages arrive.
    pub record: Option<InstanceState>,
}

impl Session {
    /// Takes the instance: its lock (held until the process ends), stale state cleared, the
    /// rootfs and state disk reset when asked, and the state disk's lock unless there is none.
    /// A bundle is unpacked here, under the lock, and fills in `--kernel`/`--rootfs`.
    pub fn claim(args: &mut UpArgs, progress: &Progress) -> Result<Self, UpError> {
        let sdir = StateDir::for_name(&args.name)?;
        let lock = sdir.lock()?;
        if let Some(note) = sdir.clear_stale() {
            progress.note(&note);
        }
        if let Some(note) = crate::bundle::resolve(args, &sdir)? {
            progress.note(&note);
        }
        // Exclusive to reset (refused while any VM uses the root), shared to boot from it.
        let root = reset::lock_root(args.rootfs_path(), args.reset)?;
        if args.reset {
            progress.note(&reset::run(args.rootfs_path(), &sdir, args.yes)?);
        }
        let disk_lock = match args.no_state_disk {
            true => None,
            false => Some(state_disk::lock(&sdir)?),
        };
        Ok(Self {
            lock: Some(lock),
            disk_lock,
            state: Some(sdir),
            root: Some(root),
            ..Self::default()
        })
    }

    /// Rewrites the state file and the last-boot timeline; a failure is reported, not fatal.
    pub fn publish(&self, timeline: &Timeline, progress: &Progress) {
        let Some(state) = &self.state else { return };
        if let Some(record) = &self.record {
            if let Err(e) = state.write_state(record) {
                progress.error(&e.to_string());
            }
        }
        if let Err(e) = timeline.write(&state.last_boot_path()) {
            progress.error(&e.to_string());
        }
    }

    fn stop_all(&mut self) {
        while let Some(mut h) = self.helpers.pop() {
            h.stop();
        }
        if let Some(dir) = &self.run_dir {
            dir.remove_sockets();
        }
    }

    /// Ends the run: stops what still runs, writes the report and the last-boot timeline with
    /// `code`, removes the state file, and releases the instance last.
    pub fn close(
        mut self,
        timeline: &mut Timeline,
        clock: Instant,
        code: i32,
        report: Option<&Path>,
    ) {
        self.stop_all();
        timeline.host(clock.elapsed().as_micros() as u64, "host-exit", json!(code));
        timeline.summary.host_exit_code = code;
        if let Some(path) = report {
            if let Err(e) = timeline.write(path) {
                eprintln!("openshell-host: {e}");
            }
        }
        if let Some(state) = &self.state {
            if let Err(e) = timeline.write(&state.last_boot_path()) {
                eprintln!("openshell-host: {e}");
            }
            state.remove_state();
        }
        // The locks go last: until here another `up` of this instance, or a reset of its
        // root, must wait.
        drop(self.disk_lock.take());
        drop(self.lock.take());
        drop(self.root.take());
    }
}
