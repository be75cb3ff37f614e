//! `openshell-host status`: whether an instance runs (by its lock), what the state file says
//! about it, its state disk, and the phase timings of its last boot. Exit 0 running, 3 not
//! running, 1 on error.

use serde_json::{json, Value};

use super::state::{self, StateDir, StateError};
use super::state_disk::{self, human};

/// Exit code of `status` when the instance is not running (LSB's "program is not running").
pub const NOT_RUNNING: i32 = 3;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "default")]
    pub name: String,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The `summary` of last-boot.json, reduced to what status shows.
fn last_boot(sdir: &StateDir) -> Value {
    let Some(boot) = state::read_json(&sdir.last_boot_path()) else {
        return Value::Null;
    };
    let s = &boot["summary"];
    let ms = |v: &Value| v.as_u64().map(|us| us as f64 / 1000.0);
    let to_ready = match (s["vmm_started_us"].as_u64(), s["ready_us"].as_u64()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1000.0),
        _ => None,
    };
    json!({
        "started_at_unix_ms": boot["host_start_unix_ms"],
        "vm_start_to_ready_ms": to_ready,
        "kernel_ms": ms(&s["init_entry_guest_us"]),
        "phases": s["phases"],
        "exit_status": s["exit_status"],
        "error": s["error"],
    })
}

pub fn run(args: &StatusArgs) -> Result<i32, StateError> {
    let sdir = StateDir::for_name(&args.name)?;
    let running = sdir.is_running()?;
    let record = if running { sdir.read_state()? } else { None };
    let boot = last_boot(&sdir);
    let uptime_s = record
        .as_ref()
        .map(|r| state::unix_ms().saturating_sub(r.started_at_unix_ms) / 1000);
    if args.json {
        let v = json!({
            "name": args.name,
            "running": running,
            "state_dir": sdir.path,
            "pid": record.as_ref().map(|r| r.host_pid),
            "vmm_pid": record.as_ref().and_then(|r| r.vmm_pid),
            "uptime_s": uptime_s,
            "backend": record.as_ref().map(|r| r.backend.clone()),
            "arch": record.as_ref().map(|r| r.arch.clone()),
            "ports": record.as_ref().map(|r| r.ports.clone()),
            "ready_stages": record.as_ref().map(|r| r.ready_stages.clone()),
            "console_log": record.as_ref().map(|r| r.console_log.clone()),
            "state_disk": disk_json(&sdir),
            "last_boot": boot,
        });
        println!("{v}");
    } else {
        match &record {
            Some(r) => {
                println!(
                    "instance {:?}: running (openshell-host up pid {}, {} pid {}), up {}",
                    args.name,
                    r.host_pid,
                    r.backend,
                    r.vmm_pid.map(|p| p.to_string()).unwrap_or("-".into()),
                    human_duration(uptime_s.unwrap_or(0))
                );
                println!("  arch: {}", r.arch);
                println!(
                    "  ports: {}",
                    if r.ports.is_empty() {
                        "none".into()
                    } else {
                        r.ports.join(", ")
                    }
                );
                println!(
                    "  ready: {}",
                    if r.ready_stages.is_empty() {
                        "not yet".into()
                    } else {
                        crate::safe_text::escape(&r.ready_stages.join(", ")).into_owned()
                    }
                );
                println!("  console: {}", r.console_log.display());
            }
            None if running => println!("instance {:?}: starting", args.name),
            None => println!("instance {:?}: not running", args.name),
        }
        println!("  {}", disk_line(&sdir));
        print_boot(&boot);
    }
    Ok(if running { 0 } else { NOT_RUNNING })
}

/// The state disk's image: its path, its size as the guest sees it (apparent) and what it
/// occupies on the host (allocated blocks; the image is sparse).
fn disk_json(sdir: &StateDir) -> Value {
    match state_disk::usage(sdir) {
        Some(u) => json!({
            "path": u.path,
            "apparent_bytes": u.apparent,
            "allocated_bytes": u.allocated,
        }),
        None => Value::Null,
    }
}

fn disk_line(sdir: &StateDir) -> String {
    match state_disk::usage(sdir) {
        Some(u) => format!(
            "state disk: {} ({} apparent, {} allocated)",
            u.path.display(),
            human(u.apparent),
            human(u.allocated)
        ),
        None => "state disk: none".into(),
    }
}

fn print_boot(boot: &Value) {
    if boot.is_null() {
        return;
    }
    let ms = |v: &Value| {
        v.as_f64()
            .map(|m| format!("{m:.1} ms"))
            .unwrap_or("-".into())
    };
    println!(
        "last boot: kernel {}, VM start to ready {}",
        ms(&boot["kernel_ms"]),
        ms(&boot["vm_start_to_ready_ms"])
    );
    for p in boot["phases"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<8} {:>9.3} ms",
            crate::safe_text::escape(p["name"].as_str().unwrap_or("?")),
            p["outcome"].as_str().unwrap_or("?"),
            p["duration_us"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
    if let Some(status) = boot["exit_status"].as_i64() {
        println!("  guest exit status: {status}");
    }
    if let Some(e) = boot["error"].as_str() {
        println!("  error: {}", crate::safe_text::escape(e));
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_disk_is_shown_with_both_sizes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sdir = StateDir::at("t", tmp.path().join("t"));
        sdir.create().expect("state dir");
        assert_eq!(disk_json(&sdir), Value::Null);
        assert_eq!(disk_line(&sdir), "state disk: none");
        let lock = state_disk::lock(&sdir).expect("lock");
        let req = state_disk::Request {
            size: 64 << 20,
            explicit: true,
        };
        let disk = state_disk::prepare(&sdir, req, &lock).expect("disk");
        // One MiB of data: allocated, while the rest stays a hole.
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&disk.path)
                .expect("open"),
            &[1u8; 1 << 20],
            0,
        )
        .expect("write");
        let v = disk_json(&sdir);
        assert_eq!(v["path"], json!(disk.path));
        assert_eq!(v["apparent_bytes"], json!(64u64 << 20));
        let allocated = v["allocated_bytes"].as_u64().expect("allocated");
        assert!(((1 << 20)..(8 << 20)).contains(&allocated), "{allocated}");
        let line = disk_line(&sdir);
        assert!(
            line.starts_with(&format!(
                "state disk: {} (64 MiB apparent, ",
                disk.path.display()
            )),
            "{line}"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(5), "5 s");
        assert_eq!(human_duration(125), "2 min 5 s");
        assert_eq!(human_duration(7260), "2 h 1 min");
    }
}
