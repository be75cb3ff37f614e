//! The qemu backend: `-M microvm` on x86_64 and `-M virt` on aarch64, under KVM or software
//! emulation (`accel` decides), guest memory in a shared memfd so the vhost-user daemons
//! (virtio-fs, vsock) can map it.
//! Also the arguments of those two daemons, which run next to qemu only.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use openshell_shared::Arch;

#[cfg(test)]
use super::spec::Engine;
use super::spec::{VmSpec, GUEST_MAC, STATE_DISK_SERIAL};

/// `--accel`: what qemu runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM where KVM can run the guest (a probe says), else software emulation, saying why.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct Qemu {
    /// The emulator binary; `qemu-system-<arch>` on PATH by default.
    pub program: Option<PathBuf>,
}

/// The machine model and its options, without the memory backend the full VM adds.
pub fn machine(arch: Arch) -> &'static str {
    match arch {
        // No ACPI: the microvm needs none, and the guest kernel has it off.
        Arch::X86_64 => "microvm,acpi=off",
        Arch::Aarch64 => "virt",
    }
}

/// A qemu that sets up the machine and vCPU of a boot under KVM, paused before the first
/// instruction (`-S`), with its monitor on stdin to be told `quit`: where KVM cannot run the
/// guest, qemu fails here as it would at boot (`accel::probe`).
pub fn kvm_probe_args(arch: Arch) -> Vec<OsString> {
    [
        "-M",
        machine(arch),
        "-accel",
        "kvm",
        "-cpu",
        "max",
        "-m",
        "64M",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-monitor",
        "stdio",
    ]
    .map(OsString::from)
    .to_vec()
}

impl Qemu {
    pub fn program(&self, arch: Arch) -> PathBuf {
        self.program
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("qemu-system-{}", arch.name())))
    }

    /// The full argument vector (without the program).
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mem = format!("{}M", spec.memory_mib);
        let machine = format!("{},memory-backend=mem", machine(spec.arch));
        let accel = spec.engine.name();
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&["-M", &machine, "-accel", accel, "-cpu", "max", "-m", &mem]);
        push(&["-smp", &spec.cpus.to_string()]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
        // -no-reboot: the guest's reset is how it powers off.
        push(&["-nodefaults", "-nographic", "-no-reboot"]);
        push(&["-serial", &format!("file:{}", spec.console_log.display())]);
        push(&["-kernel", &spec.kernel.display().to_string()]);
        push(&["-append", &spec.cmdline]);
        push(&[
            "-chardev",
            &format!("socket,id=vfs,path={}", spec.virtiofs_socket.display()),
            "-device",
            "vhost-user-fs-device,chardev=vfs,tag=rootfs",
        ]);
        push(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", spec.vsock_socket.display()),
            "-device",
            "vhost-user-vsock-device,chardev=vsock",
        ]);
        if let Some(sock) = &spec.net_socket {
            push(&[
                "-netdev",
                &format!(
                    "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                    sock.display()
                ),
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={}", GUEST_MAC),
            ]);
        }
        if let Some(image) = &spec.state_disk {
            push(&state_disk_args(image).each_ref().map(String::as_str));
        }
        // Debian's virtiofsd speaks only modern virtio.
        push(&["-global", "virtio-mmio.force-legacy=false"]);
        args
    }
}

/// The state disk as a virtio-blk device on the machine's virtio-mmio bus (microvm and virt
/// alike), with the serial the guest finds it by.
///
/// `cache=writeback`: the device tells the guest it has a volatile write cache, so the guest's
/// flushes (ext4's journal commits, `sync`) arrive, and qemu answers each with an fdatasync of
/// the image: what the guest flushed is on the host's disk. (`unsafe` would drop those flushes,
/// `none`/`directsync` need O_DIRECT, which macOS and some file systems lack.) `aio=threads`
/// works everywhere `cache=writeback` does. `discard=unmap`: blocks the guest frees become holes
/// again, so the sparse image shrinks on the host.
fn state_disk_args(image: &Path) -> [String; 4] {
    // In qemu's option syntax a comma is written twice.
    let file = image.display().to_string().replace(',', ",,");
    [
        "-drive".into(),
        format!(
            "file={file},if=none,id=state,format=raw,cache=writeback,aio=threads,discard=unmap"
        ),
        "-device".into(),
        format!("virtio-blk-device,drive=state,serial={STATE_DISK_SERIAL}"),
    ]
}

/// virtiofsd serving `rootfs` on the vhost-user `socket` qemu's `vhost-user-fs-device` connects to.
/// Without CAP_MKNOD: a guest's device nodes would land in the host's tree, where whoever reaches
/// them gets the host's device (the guest's own /dev is devtmpfs, and k3s's state is not on
/// virtio-fs). Setuid bits a guest root sets on its own files cannot be stopped this way (the
/// owner may set them without any capability): `up` refuses, as root, a root filesystem other
/// users can reach.
pub fn virtiofsd_args(socket: &Path, rootfs: &Path) -> Vec<OsString> {
    vec![
        format!("--socket-path={}", socket.display()).into(),
        "-o".into(),
        format!("source={}", rootfs.display()).into(),
        "-o".into(),
        "cache=auto".into(),
        "-o".into(),
        "modcaps=-mknod".into(),
    ]
}

/// vhost-device-vsock for guest CID 3: qemu's `vhost-user-vsock-device` connects to
/// `vhost_socket`, and guest connections arrive on (and host ones leave from) `uds`.
pub fn vsock_helper_args(vhost_socket: &Path, uds: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        "3".into(),
        "--socket".into(),
        vhost_socket.into(),
        "--uds-path".into(),
        uds.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arch: Arch) -> VmSpec {
        VmSpec {
            arch,
            kernel: "/k/bzImage".into(),
            cmdline: "console=ttyS0 quiet".into(),
            memory_mib: 256,
            cpus: 2,
            engine: Engine::Tcg,
            virtiofs_socket: "/r/virtiofsd.sock".into(),
            vsock_socket: "/r/vhost-vsock.sock".into(),
            console_log: "/r/console.log".into(),
            net_socket: None,
            state_disk: None,
        }
    }

    fn joined(q: &Qemu, arch: Arch) -> String {
        line(q, &spec(arch))
    }

    /// The command line `q` makes for `s`, as one string.
    fn line(q: &Qemu, s: &VmSpec) -> String {
        q.args(s)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn x86_64_microvm_command() {
        let q = Qemu { program: None };
        assert_eq!(q.program(Arch::X86_64), PathBuf::from("qemu-system-x86_64"));
        assert_eq!(
            joined(&q, Arch::X86_64),
            "-M microvm,acpi=off,memory-backend=mem -accel tcg -cpu max -m 256M -smp 2 \
             -object memory-backend-memfd,id=mem,size=256M,share=on -nodefaults -nographic -no-reboot \
             -serial file:/r/console.log -kernel /k/bzImage -append console=ttyS0 quiet \
             -chardev socket,id=vfs,path=/r/virtiofsd.sock -device vhost-user-fs-device,chardev=vfs,tag=rootfs \
             -chardev socket,id=vsock,path=/r/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock \
             -global virtio-mmio.force-legacy=false"
        );
    }

    #[test]
    fn aarch64_virt_command() {
        let q = Qemu {
            program: Some("/opt/q".into()),
        };
        assert_eq!(q.program(Arch::Aarch64), PathBuf::from("/opt/q"));
        let mut s = spec(Arch::Aarch64);
        s.engine = Engine::Kvm;
        let line = line(&q, &s);
        assert!(
            line.starts_with("-M virt,memory-backend=mem -accel kvm "),
            "{line}"
        );
        assert!(line.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(!line.contains("-netdev"), "no network unless asked");
        assert!(!line.contains("-drive"), "no disk unless asked");
    }

    /// The disk comes before the closing `-global` on both machines, with a flushing cache mode,
    /// the serial the guest looks for, and a comma in the path escaped.
    #[test]
    fn state_disk_device() {
        let q = Qemu { program: None };
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let mut s = spec(arch);
            s.state_disk = Some("/state/a,b/state.img".into());
            let args: Vec<String> = q
                .args(&s)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let at = args.iter().position(|a| a == "-drive").expect("-drive");
            assert_eq!(
                args[at..at + 6],
                [
                    "-drive",
                    "file=/state/a,,b/state.img,if=none,id=state,format=raw,cache=writeback,\
                     aio=threads,discard=unmap",
                    "-device",
                    "virtio-blk-device,drive=state,serial=openshell-state",
                    "-global",
                    "virtio-mmio.force-legacy=false",
                ]
            );
        }
    }

    #[test]
    fn passt_network_device() {
        let q = Qemu { program: None };
        let mut s = spec(Arch::X86_64);
        s.net_socket = Some("/r/passt/passt.sock".into());
        let line = line(&q, &s);
        assert!(
            line.contains(
                "-netdev stream,id=net0,server=off,addr.type=unix,addr.path=/r/passt/passt.sock \
             -device virtio-net-device,netdev=net0,mac=5a:94:ef:e4:0c:ee"
            ),
            "{line}"
        );
    }

    #[test]
    fn vhost_user_daemon_commands() {
        let fs = virtiofsd_args(Path::new("/r/virtiofsd.sock"), Path::new("/images/root"));
        assert_eq!(
            fs,
            [
                "--socket-path=/r/virtiofsd.sock",
                "-o",
                "source=/images/root",
                "-o",
                "cache=auto",
                "-o",
                "modcaps=-mknod"
            ]
            .map(OsString::from)
        );
        let vsock = vsock_helper_args(Path::new("/r/vhost-vsock.sock"), Path::new("/r/vsock.sock"));
        assert_eq!(
            vsock,
            [
                "--guest-cid",
                "3",
                "--socket",
                "/r/vhost-vsock.sock",
                "--uds-path",
                "/r/vsock.sock"
            ]
            .map(OsString::from)
        );
    }
}
