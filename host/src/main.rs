//! openshell-host: starts the OpenShell gateway VM and shows its boot, and runs commands in it.
//!
//! Every subcommand returns its exit code or a [`failure::Failure`]; this is the one place that
//! prints such an error and exits.

mod backend;
mod bundle;
mod channel;
mod children;
mod credentials;
mod exec;
mod failure;
mod gateway_health;
mod gateway_metadata;
mod health_proto;
#[cfg(test)]
mod health_server;
mod kubeconfig;
mod lifecycle;
mod net;
mod nofile;
mod private_dir;
mod progress;
mod readiness;
mod report;
mod rundir;
mod safe_text;
mod sizing;
#[cfg(target_os = "macos")]
mod sysctl;
#[cfg(test)]
mod test_pki;
mod up;

use clap::{Parser, Subcommand};

use failure::Failure;
use lifecycle::detach;

#[derive(Parser)]
#[command(
    name = "openshell-host",
    version,
    about = "Runs the OpenShell gateway VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the VM, show each boot phase, and exit with the workload's status.
    Up(Box<up::args::UpArgs>),
    /// Run a command in a running VM (default: sh) and exit with its status.
    Exec(exec::ExecArgs),
    /// Stop a running instance: ask the guest to shut down, kill it past the deadline.
    Down(lifecycle::down::DownArgs),
    /// Show whether an instance runs and its last boot (exit 0 running, 3 not running).
    Status(lifecycle::status::StatusArgs),
    /// Show the last boot's events and the guest console log.
    Logs(lifecycle::logs::LogsArgs),
}

/// What errors are printed after.
const PROGRAM: &str = "openshell-host";

fn main() {
    // Before any thread or child: every VMM and helper inherits the raised limit.
    nofile::raise_at_start();
    let cli = Cli::parse();
    let code = match cli.command {
        // Decided before `up` blocks any signal or starts any thread: the background process
        // of `--detach` starts from a clean slate.
        Cmd::Up(args) if detach::is_child() => {
            exit_code(PROGRAM, up::run(detach::in_background(*args)))
        }
        Cmd::Up(args) if args.detach => exit_code(PROGRAM, detach::run(&args)),
        Cmd::Up(args) => exit_code(PROGRAM, up::run(*args)),
        Cmd::Exec(args) => exit_code("openshell-host exec", exec::run(args)),
        Cmd::Down(args) => exit_code(PROGRAM, lifecycle::down::run(&args)),
        Cmd::Status(args) => exit_code(PROGRAM, lifecycle::status::run(&args)),
        Cmd::Logs(args) => exit_code(PROGRAM, lifecycle::logs::run(&args)),
    };
    std::process::exit(code);
}

/// The process's exit code; a failure is printed first, as `<who>: <error>`.
fn exit_code<E: Failure>(who: &str, result: Result<i32, E>) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("{who}: {e}");
        e.exit_code()
    })
}
