//! The VMM process: started for a [`VmSpec`] with the chosen backend, reaped on a thread of its
//! own so that its exit is an [`Event`] like any other, and killed when the loop decides.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::args::UpArgs;
use super::error::UpError;
use super::event::Event;
use super::helpers::gvproxy_framing;
use crate::backend::libkrun;
use crate::backend::qemu::Qemu;
use crate::backend::spec::VmSpec;
use crate::backend::Chosen;
use crate::children::Helper;
use crate::lifecycle::state_disk::DiskLock;
use crate::net::gvproxy::Framing;
use crate::net::NetBackend;
use crate::rundir::RunDir;

/// The started VMM: its pid for signals and the waiter, and its index in `helpers` when it is a
/// [`Helper`] (qemu); a forked libkrun child is reaped by the waiter alone.
pub struct StartedVmm {
    pub name: &'static str,
    pub pid: u32,
    pub helper: Option<usize>,
    /// The VMM's own stdout and stderr.
    pub log: PathBuf,
}

/// Starts the chosen VMM for `spec`. Called on the main thread: the VMM's parent-death signal is
/// tied to the thread that forks it. `disk_lock` (the state disk's lock) is inherited by the VMM,
/// so no other VM can take the disk until this VMM is gone, even if `up` dies first.
pub fn start(
    backend: &Chosen,
    net: NetBackend,
    args: &UpArgs,
    spec: &VmSpec,
    dir: &RunDir,
    disk_lock: Option<&DiskLock>,
    helpers: &mut Vec<Helper>,
) -> Result<StartedVmm, UpError> {
    let keep = disk_lock.map(DiskLock::raw_fd);
    match backend {
        Chosen::Qemu => {
            let qemu = Qemu {
                program: args.qemu.clone(),
            };
            let mut cmd = Command::new(qemu.program(args.arch));
            cmd.args(qemu.args(spec));
            if let Some(fd) = keep {
                crate::children::keep_open(&mut cmd, fd);
            }
            let log = dir.path.join("qemu.log");
            let vmm = Helper::spawn("qemu", cmd, &log)?;
            let pid = vmm.child.id();
            helpers.push(vmm);
            Ok(StartedVmm {
                name: "qemu",
                pid,
                helper: Some(helpers.len() - 1),
                log,
            })
        }
        Chosen::Libkrun(krun) => {
            let channel = dir.channel_socket();
            let exec = dir.exec_socket();
            let vm = libkrun::Vm {
                spec,
                rootfs: args.rootfs_path(),
                channel_socket: &channel,
                exec_socket: &exec,
                net: spec
                    .net_socket
                    .clone()
                    .map(|path| match gvproxy_framing(backend) {
                        Framing::VfkitDatagram if net == NetBackend::Gvproxy => {
                            libkrun::Net::VfkitDatagram(path)
                        }
                        _ => libkrun::Net::UnixStream(path),
                    }),
            };
            let log = dir.path.join("libkrun.log");
            let pid = krun.configure(&vm)?.start(&log, keep)?;
            Ok(StartedVmm {
                name: "libkrun",
                pid,
                helper: None,
                log,
            })
        }
    }
}

/// Reaps the VMM on a thread of its own and reports its exit status (128 + N for signal N) as
/// [`Event::VmmExited`].
pub fn watch(pid: u32, tx: SyncSender<Event>) -> JoinHandle<()> {
    let pid = Pid::from_raw(pid as i32);
    std::thread::spawn(move || {
        let status = loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(s) => break s,
                Err(_) => break WaitStatus::StillAlive,
            }
        };
        let code = match status {
            WaitStatus::Exited(_, c) => Some(c),
            WaitStatus::Signaled(_, s, _) => Some(128 + s as i32),
            _ => None,
        };
        let _ = tx.send(Event::VmmExited(code));
    })
}

/// SIGKILL to the VMM; its exit then arrives through [`watch`].
pub fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}
