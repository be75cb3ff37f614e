//! openshell-host: starts the OpenShell gateway VM and shows its boot, and runs commands in it.

mod backend;
mod channel;
mod children;
mod credentials;
mod exec;
mod net;
mod progress;
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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Up(args) => up::run(*args),
        Cmd::Exec(args) => exec::run(args),
    };
    std::process::exit(code);
}
