//! The arguments of `openshell-host up` and its exit codes: what `main`, `up --detach` and the
//! run itself share. Imports nothing from `up`.

use std::path::{Path, PathBuf};

use openshell_shared::Arch;

use crate::backend::qemu::Accel;
use crate::backend::BackendChoice;
use crate::gateway_health::ReadyProbe;
use crate::lifecycle::state_disk::DiskSize;
use crate::net::choice::NetChoice;
use crate::net::Forward;

/// Exit codes of `up` besides the workload's own status.
pub mod code {
    /// Could not start (bad arguments, missing program, busy instance).
    pub const SETUP: i32 = 1;
    /// The VM ended without reporting an exit.
    pub const NO_EXIT: i32 = 2;
    /// The guest reported a fatal boot error.
    pub const GUEST_FATAL: i32 = 3;
    /// The guest broke the boot channel protocol.
    pub const PROTOCOL: i32 = 4;
    /// No hello from the guest in time.
    pub const TIMEOUT: i32 = 5;
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Guest architecture.
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    /// Guest kernel: the ELF vmlinux (x86_64; qemu enters it through PVH) or a bzImage, or the
    /// Image (aarch64). Default: the bundle's.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Host directory shared as the guest's root filesystem. Default: the bundle's, unpacked in
    /// the instance's state directory.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// A bundle (`cargo xtask bundle`) to boot: checked, unpacked once per version into
    /// `<state dir>/bundles/`, reused after. Without it and without `--kernel`/`--rootfs`,
    /// `openshell-gateway-<arch>.bundle` next to this program, else the one built in.
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// Guest memory in MiB. Default: the root's `manifest.json` (`vm.memory_mib`: the gateway
    /// 8192, base 512), at most 75% of this machine's memory.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// vCPUs. Default: the root's `manifest.json` (`vm.cpus`: the gateway 4, base 1), at most
    /// this machine's online CPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Instance name (letters, digits, '_', '-'): one state and one run directory per instance.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Run in the background (output to `<state>/host.log`); return once the guest reports
    /// `--ready-stage`, non-zero if the boot fails first.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Ready stage `--detach` waits for: by default `ready`, the host's own mark once the last
    /// stage the guest announced (and, for the gateway, the host's probe of its port) arrived.
    #[arg(long, default_value = "ready", value_name = "STAGE")]
    pub ready_stage: String,
    /// Seconds each readiness stage the guest announced may take after the one before; one that
    /// does not come in time is named and the VM stopped.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub stage_timeout: u64,
    /// How the host decides that the gateway behind the forwarded port is ready after the guest
    /// reported `gateway-ready`: `grpc`, its health method over mutual TLS answers HEALTHY
    /// (what the OpenShell CLI needs); `tcp`, the port accepts and waits (the fallback).
    #[arg(long, value_enum, default_value_t = ReadyProbe::Grpc)]
    pub ready_probe: ReadyProbe,
    /// Leave the OpenShell CLI's active gateway as it is: by default a healthy gateway becomes
    /// the active one (`$XDG_CONFIG_HOME/openshell/active_gateway`).
    #[arg(long)]
    pub no_activate: bool,
    /// Seconds `--detach` waits for the ready stage before giving up (the VM keeps running).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub ready_timeout: u64,
    /// Start a fresh cluster: delete the state disk and remove the guest's runtime state (pods,
    /// CNI state, k3s database) from the rootfs first.
    #[arg(long)]
    pub reset: bool,
    /// Size of the instance's state disk, `<state dir>/state.img` (sparse; K, M, G or T). A new
    /// disk is made this size, a smaller one grows to it, a bigger one is an error: a disk never
    /// shrinks. Default: 32G for a new disk; an existing one keeps its size (at least 32G).
    #[arg(long, value_name = "SIZE", conflicts_with = "no_state_disk")]
    pub state_disk_size: Option<DiskSize>,
    /// Boot without the state disk: the guest keeps all its state in the root filesystem. For
    /// roots that cannot format one (the base profile's has no mke2fs).
    #[arg(long)]
    pub no_state_disk: bool,
    /// Do not ask before `--reset` (needed when not on a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// vhost-device-vsock binary.
    #[arg(long, default_value = "vhost-device-vsock")]
    pub vsock_helper: PathBuf,
    /// virtio-fs daemon (Debian's by default).
    #[arg(long, default_value = "/usr/lib/qemu/virtiofsd")]
    pub virtiofsd: PathBuf,
    /// VMM: qemu, libkrun, or auto (libkrun when it loads, runs the guest's arch and the
    /// hypervisor makes a VM; else qemu on Linux, saying why, and an error on macOS, where qemu
    /// would be software emulation). On machines where KVM fails on full guests even so, pick
    /// `--backend qemu`.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// libkrun library to load; else `OPENSHELL_LIBKRUN`, else `libkrun.so.1` (macOS:
    /// `libkrun.1.dylib`) through the dynamic loader.
    #[arg(long, value_name = "PATH")]
    pub libkrun: Option<PathBuf>,
    /// Emulator binary; `qemu-system-<arch>` by default.
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// qemu's accelerator. `auto`: KVM where a paused qemu comes up under KVM with the boot's
    /// machine and vCPU (some machines open /dev/kvm and still fail full guests), else software
    /// emulation, saying why; `tcg` forces software emulation (CI, the VM tests).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Appended to the kernel command line (e.g. `openshell.hostname=gw`).
    #[arg(long)]
    pub cmdline_extra: Option<String>,
    /// Write the boot timeline as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Seconds to wait for the guest's hello.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Time the workload gets to stop when the host is asked to shut down (at most an hour:
    /// the guest's own limit, and the host adds it to its clock).
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(..=openshell_shared::config::MAX_GRACE_MS))]
    pub grace_ms: u64,
    /// Guest console log; `<run-dir>/console.log` by default.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// User-mode network for the guest. `auto`: gvproxy when one is found (--gvproxy, PATH, the
    /// cache `cargo xtask` fills, podman's helpers), else passt on Linux.
    #[arg(long, value_enum, default_value_t = NetChoice::Auto)]
    pub net: NetChoice,
    /// Forward TCP 127.0.0.1:HOST on this machine to GUEST in the VM (repeatable; a bare PORT
    /// means the same port on both sides). Default: the gateway's 30051.
    #[arg(short = 'p', long = "port", value_name = "HOST:GUEST")]
    pub ports: Vec<Forward>,
    /// A port of this machine's 127.0.0.1 the guest (k3s, the gateway, pods) may reach
    /// (repeatable, at most 32). None by default: the guest reaches no local service.
    #[arg(long = "host-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub host_ports: Vec<u16>,
    /// passt binary.
    #[arg(long, default_value = "passt")]
    pub passt: PathBuf,
    /// gvproxy binary; else looked for on PATH, in the cache and in podman's helpers.
    #[arg(long, value_name = "PATH")]
    pub gvproxy: Option<PathBuf>,
    /// Print every event as a JSON line instead of human-readable lines.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the guest as the workload, with its arguments (instead of k3s on a
    /// gateway root).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
    pub exec: Vec<String>,
}

impl UpArgs {
    /// The kernel to boot: `--kernel`, or the bundle's once resolved (`crate::bundle`).
    pub fn kernel_path(&self) -> &Path {
        self.kernel.as_deref().unwrap_or(Path::new(""))
    }

    /// The root filesystem: `--rootfs`, or the bundle's once resolved.
    pub fn rootfs_path(&self) -> &Path {
        self.rootfs.as_deref().unwrap_or(Path::new(""))
    }
}

/// Parses `up`'s arguments as the command line would (tests only: `UpArgs` is a part of `Cli`).
#[cfg(test)]
pub fn parse<I: AsRef<std::ffi::OsStr>>(argv: &[I]) -> Result<UpArgs, clap::Error> {
    use clap::Parser;
    use std::ffi::OsStr;
    #[derive(Parser)]
    struct Up {
        #[command(flatten)]
        args: UpArgs,
    }
    let argv = std::iter::once(OsStr::new("up")).chain(argv.iter().map(AsRef::as_ref));
    Up::try_parse_from(argv).map(|up| up.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: [&str; 4] = ["--kernel", "/k/bzImage", "--rootfs", "/images/root"];

    fn with_required(extra: &[&str]) -> Result<UpArgs, clap::Error> {
        parse(&[&REQUIRED[..], extra].concat())
    }

    #[test]
    fn defaults() {
        let a = with_required(&[]).expect("parse");
        assert_eq!(a.kernel_path(), Path::new("/k/bzImage"));
        assert_eq!(a.rootfs_path(), Path::new("/images/root"));
        assert!(a.bundle.is_none());
        assert_eq!(a.arch, Arch::host());
        assert_eq!((a.memory, a.cpus), (None, None), "sized by the root");
        assert_eq!(a.name, "default");
        assert!(!a.detach && !a.reset && !a.yes && !a.json);
        assert_eq!(a.ready_stage, "ready");
        assert_eq!((a.stage_timeout, a.ready_timeout), (300, 600));
        assert_eq!((a.timeout, a.grace_ms), (60, 10_000));
        assert_eq!(a.vsock_helper, PathBuf::from("vhost-device-vsock"));
        assert_eq!(a.virtiofsd, PathBuf::from("/usr/lib/qemu/virtiofsd"));
        assert_eq!(a.backend, BackendChoice::Auto);
        assert_eq!(a.accel, Accel::Auto);
        assert_eq!(a.net, NetChoice::Auto);
        assert_eq!(a.passt, PathBuf::from("passt"));
        assert!(a.gvproxy.is_none());
        assert!(a.ports.is_empty() && a.exec.is_empty());
        assert!(a.host_ports.is_empty(), "no host loopback port by default");
        assert!(a.run_dir.is_none() && a.libkrun.is_none() && a.qemu.is_none());
        assert!(a.cmdline_extra.is_none() && a.report.is_none() && a.console_log.is_none());
        assert!(a.state_disk_size.is_none() && !a.no_state_disk);
        assert_eq!(a.ready_probe, ReadyProbe::Grpc);
        assert!(!a.no_activate);
    }

    #[test]
    fn the_ready_probe_and_activation() {
        let a = with_required(&["--ready-probe", "tcp", "--no-activate"]).expect("parse");
        assert_eq!(a.ready_probe, ReadyProbe::Tcp);
        assert!(a.no_activate);
        assert!(with_required(&["--ready-probe", "http"]).is_err());
    }

    #[test]
    fn state_disk_flags() {
        let a = with_required(&["--state-disk-size", "64G"]).expect("parse");
        assert_eq!(a.state_disk_size, Some(DiskSize(64 << 30)));
        assert!(
            with_required(&["--no-state-disk"])
                .expect("parse")
                .no_state_disk
        );
        let err = with_required(&["--state-disk-size", "1M"]).unwrap_err();
        assert!(err.to_string().contains("minimum 64 MiB"), "{err}");
        assert!(
            with_required(&["--no-state-disk", "--state-disk-size", "64G"]).is_err(),
            "a size for no disk is a contradiction"
        );
    }

    /// Either may come from a bundle (`crate::bundle` resolves what is missing, or says which
    /// bundle it looked for).
    #[test]
    fn kernel_and_rootfs_are_optional() {
        let a = parse(&["--bundle", "/b/gw.bundle"]).expect("bundle only");
        assert_eq!(a.bundle.as_deref(), Some(Path::new("/b/gw.bundle")));
        assert!(a.kernel.is_none() && a.rootfs.is_none());
        assert_eq!(
            a.rootfs_path(),
            Path::new(""),
            "unresolved: no directory, never a guess"
        );
        let a = parse(&["--kernel", "/k"]).expect("kernel only");
        assert!(a.rootfs.is_none());
    }

    #[test]
    fn short_flags_ports_and_choices() {
        let a = with_required(&[
            "-d",
            "-y",
            "-p",
            "8080",
            "-p",
            "2222:22",
            "--backend",
            "libkrun",
            "--accel",
            "kvm",
            "--net",
            "none",
            "--arch",
            "aarch64",
        ])
        .expect("parse");
        assert!(a.detach && a.yes);
        assert_eq!(
            a.ports,
            vec![
                Forward {
                    host: 8080,
                    guest: 8080
                },
                Forward {
                    host: 2222,
                    guest: 22
                }
            ]
        );
        assert_eq!(a.backend, BackendChoice::Libkrun);
        assert_eq!(a.accel, Accel::Kvm);
        assert_eq!(
            with_required(&["--accel", "tcg"]).expect("tcg").accel,
            Accel::Tcg
        );
        assert!(with_required(&["--accel", "hvf"]).is_err());
        assert_eq!(a.net, NetChoice::None);
        assert_eq!(a.arch, Arch::Aarch64);
        assert!(with_required(&["-p", "0"]).is_err(), "port 0 is refused");
        assert!(with_required(&["--backend", "vbox"]).is_err());
    }

    #[test]
    fn network_names_and_the_gvproxy_path() {
        let a = with_required(&["--net", "gvproxy", "--gvproxy", "/x/gvproxy"]).expect("parse");
        assert_eq!(a.net, NetChoice::Gvproxy);
        assert_eq!(a.gvproxy, Some(PathBuf::from("/x/gvproxy")));
        for (name, choice) in [("auto", NetChoice::Auto), ("passt", NetChoice::Passt)] {
            assert_eq!(with_required(&["--net", name]).expect(name).net, choice);
        }
        assert!(with_required(&["--net", "slirp"]).is_err());
    }

    /// A grace past an hour would overflow the host's deadline: refused naming the flag.
    #[test]
    fn a_grace_past_an_hour_is_refused() {
        assert_eq!(
            with_required(&["--grace-ms", "3600000"])
                .expect("an hour")
                .grace_ms,
            3_600_000
        );
        for big in ["3600001", "18446744073709551615"] {
            let err = with_required(&["--grace-ms", big]).unwrap_err().to_string();
            assert!(err.contains("--grace-ms"), "{err}");
        }
    }

    #[test]
    fn host_ports_are_repeatable_and_port_0_is_refused() {
        let a = with_required(&["--host-port", "8080", "--host-port", "9000"]).expect("parse");
        assert_eq!(a.host_ports, [8080, 9000]);
        for bad in ["0", "70000", "http"] {
            assert!(with_required(&["--host-port", bad]).is_err(), "{bad}");
        }
    }

    /// Everything after `--exec` is the guest command, flags included.
    #[test]
    fn exec_takes_the_rest_with_its_flags() {
        let a = with_required(&["--exec", "sh", "-c", "exit 7", "--name", "x"]).expect("parse");
        assert_eq!(a.exec, ["sh", "-c", "exit 7", "--name", "x"]);
        assert_eq!(a.name, "default");
    }
}
