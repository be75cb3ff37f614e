//! openshell-init: PID 1 of the OpenShell gateway VM, and the same binary's debugging commands
//! when run anywhere else.

mod cli;
mod console;
mod context;
mod engine;
mod exec_service;
mod host_clock;
mod k3s;
mod mountinfo;
mod netlink;
mod nftables;
mod panic;
mod phases;
mod pid1;
mod power;
mod remove;
mod reporter;
mod supervisor;
mod teardown;

use openshell_init::clock;

fn main() {
    // First thing: the boot clock, so the host can tell kernel time from init time.
    let entry_us = clock::boottime_us();
    if std::process::id() == 1 {
        pid1::boot(entry_us);
    }
    std::process::exit(cli::main(entry_us));
}
