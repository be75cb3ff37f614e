//! openshell-host: starts the OpenShell gateway VM and shows its boot, and runs commands in it.

mod backend;
mod channel;
mod children;
mod credentials;
mod exec;
mod kubeconfig;
mod lifecycle;
mod net;
mod progress;
mod readiness;
mod report;
mod rundir;
mod up;

use clap::{Parser, Subcommand};

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
    Up(Box<up::UpArgs>),
    /// Run a command in a running VM (default: sh) and exit with its status.
    Exec(exec::ExecArgs),
    /// Stop a running instance: ask the guest to shut down, kill it past the deadline.
    Down(lifecycle::down::DownArgs),
    /// Show whether an instance runs and its last boot (exit 0 running, 3 not running).
    Status(lifecycle::status::StatusArgs),
    /// Show the last boot's events and the guest console log.
    Logs(lifecycle::logs::LogsArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Up(args) => up::run(*args),
        Cmd::Exec(args) => exec::run(args),
        Cmd::Down(args) => lifecycle::down::run(&args),
        Cmd::Status(args) => lifecycle::status::run(&args),
        Cmd::Logs(args) => lifecycle::logs::run(&args),
    };
    std::process::exit(code);
}
