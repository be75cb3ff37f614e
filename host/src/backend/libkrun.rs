//! The libkrun backend: loads libkrun at run time, configures one VM context from a [`VmSpec`],
//! and runs it in a forked child. libkrun brings its own virtio-fs, vsock and virtio-net devices,
//! so no vhost-user helper runs next to it.
//!
//! Finding the library: `--libkrun PATH`, then `OPENSHELL_LIBKRUN`, then the platform's name
//! ([`PLATFORM_NAME`]) through the dynamic loader. The loader reads `LD_LIBRARY_PATH` (Linux) and
//! `DYLD_LIBRARY_PATH` (macOS) once, when the process starts, so setting them from inside the host
//! would not change where our `dlopen` looks; they work only when set by whoever starts
//! `openshell-host` (and macOS drops `DYLD_*` when a protected program such as `/bin/sh` sits in
//! between). We do not re-exec ourselves to fix that up: an explicit path is the supported way.
//! libkrun loads libkrunfw (its bundled kernel) only when no kernel is given; we always pass ours,
//! so libkrunfw is never needed.
//!
//! Configure before fork, start after: libkrun keeps contexts in a process-global map inside the
//! library, and `fork` copies the whole address space, so a context configured in the parent is
//! there, complete, in the child. Configuring in the parent turns every failing call into a typed
//! error where it can be reported (no error channel out of the child needed) and keeps the child
//! to `prctl`, `dup2` and `krun_start_enter`. The configuration calls only record settings (the
//! devices, sockets and console file are opened inside `krun_start_enter`), and only the main
//! thread calls into libkrun, so no libkrun lock is held by another thread at fork time. The
//! child then runs `krun_start_enter`, which allocates and starts threads: that is sound after a
//! fork of our multi-threaded host because glibc resets malloc's locks in the child and libkrun,
//! a cdylib with its own copy of std, shares no lock with our other threads (signal waiter, boot
//! channel). The child closes every inherited fd above stderr: no exec follows, so CLOEXEC would
//! not.

use std::ffi::{CString, NulError};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use openshell_shared::Arch;

use super::spec::{VmSpec, GUEST_MAC, STATE_DISK_SERIAL};

/// The library name the dynamic loader is asked for when no path is given (the soname).
#[cfg(target_os = "macos")]
pub const PLATFORM_NAME: &str = "libkrun.1.dylib";
#[cfg(not(target_os = "macos"))]
pub const PLATFORM_NAME: &str = "libkrun.so.1";

/// Environment variable naming the library to load.
pub const ENV_VAR: &str = "OPENSHELL_LIBKRUN";

/// Exit status of the VMM child when `krun_start_enter` returns (it never does once the VM runs:
/// libkrun then exits the process itself).
pub const START_FAILED: i32 = 125;

/// virtio-net offloads for user-mode network backends (libkrun's "compat" set): CSUM,
/// GUEST_CSUM, GUEST_TSO4, GUEST_UFO, HOST_TSO4, HOST_UFO.
pub const NET_FEATURES: u32 = 1 | 1 << 1 | 1 << 7 | 1 << 10 | 1 << 11 | 1 << 14;
/// `krun_add_net_unixgram` flag: send gvproxy's `VFKT` greeting after connecting.
pub const NET_FLAG_VFKIT: u32 = 1;

/// `krun_set_kernel` formats.
const KERNEL_FORMAT_RAW: u32 = 0;
const KERNEL_FORMAT_ELF: u32 = 1;

/// `krun_add_disk3` image format: raw.
const DISK_FORMAT_RAW: u32 = 0;
/// `krun_add_disk3` sync mode as the old system set it: on macOS RELAXED (1: a guest flush is an
/// fsync, not F_FULLFSYNC, which is slow on Apple disks), elsewhere FULL (2: every guest flush
/// reaches the disk). The same as libkrun's own default for `krun_add_disk2` on each OS.
#[cfg(target_os = "macos")]
pub const DISK_SYNC: u32 = 1;
#[cfg(not(target_os = "macos"))]
pub const DISK_SYNC: u32 = 2;

/// Where the library was looked for, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag(PathBuf),
    Env(PathBuf),
    Loader,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag(p) => write!(f, "{} (--libkrun)", p.display()),
            Origin::Env(p) => write!(f, "{} ({ENV_VAR})", p.display()),
            Origin::Loader => write!(
                f,
                "{PLATFORM_NAME} through the dynamic loader (no --libkrun, {ENV_VAR} unset)"
            ),
        }
    }
}

impl Origin {
    /// `--libkrun`, then `OPENSHELL_LIBKRUN`, then the loader.
    pub fn find(flag: Option<&Path>) -> Self {
        Self::pick(flag, std::env::var_os(ENV_VAR))
    }

    fn pick(flag: Option<&Path>, env: Option<std::ffi::OsString>) -> Self {
        if let Some(p) = flag {
            return Origin::Flag(p.to_path_buf());
        }
        match env.filter(|v| !v.is_empty()) {
            Some(p) => Origin::Env(PathBuf::from(p)),
            None => Origin::Loader,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LibkrunError {
    #[error("cannot load libkrun from {origin}: {source}")]
    Load {
        origin: Origin,
        source: libloading::Error,
    },
    #[error(
        "{origin} has no symbol {symbol}: not libkrun, or one older than the 1.19 API \
         or built without the `net` feature ({source})"
    )]
    Symbol {
        origin: Origin,
        symbol: &'static str,
        source: libloading::Error,
    },
    #[error("{call} failed: {errno}")]
    Call {
        call: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("{what} for libkrun contains a NUL byte")]
    Nul {
        what: &'static str,
        source: NulError,
    },
    #[error(
        "libkrun needs an ELF kernel on x86_64: {given} is not one and {sibling} does not exist"
    )]
    NoElfKernel { given: PathBuf, sibling: PathBuf },
    #[error("cannot read kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the VMM log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("libkrun runs only guests of this machine's architecture, not {}", .0.name())]
    ForeignArch(Arch),
    #[error("cannot fork the libkrun VMM: {0}")]
    Fork(nix::errno::Errno),
    #[error(
        "{0} has neither krun_add_disk3 nor krun_add_disk2 (built without the `blk` feature): \
         it cannot attach the state disk; use a libkrun built with `blk` (`cargo xtask libkrun`) \
         or pass --no-state-disk"
    )]
    NoDisk(Origin),
}

/// The C API, loaded once per process: every pointer here stays valid because the library is
/// never unloaded (libkrun keeps global state and its logger; unloading it is not supported).
mod ffi {
    use std::ffi::c_char;

    use crate::backend::libkrun::{LibkrunError, Origin, PLATFORM_NAME};

    pub type InitLog = unsafe extern "C" fn(i32, u32, u32, u32) -> i32;
    pub type CreateCtx = unsafe extern "C" fn() -> i32;
    pub type Ctx = unsafe extern "C" fn(u32) -> i32;
    pub type SetVmConfig = unsafe extern "C" fn(u32, u8, u32) -> i32;
    pub type CtxPath = unsafe extern "C" fn(u32, *const c_char) -> i32;
    pub type SetKernel =
        unsafe extern "C" fn(u32, *const c_char, u32, *const c_char, *const c_char) -> i32;
    pub type AddVsock = unsafe extern "C" fn(u32, u32) -> i32;
    pub type AddVsockPort2 = unsafe extern "C" fn(u32, u32, *const c_char, bool) -> i32;
    pub type AddNet = unsafe extern "C" fn(u32, *const c_char, i32, *const u8, u32, u32) -> i32;
    pub type SetExec =
        unsafe extern "C" fn(u32, *const c_char, *const *const c_char, *const *const c_char) -> i32;
    pub type AddDisk2 = unsafe extern "C" fn(u32, *const c_char, *const c_char, u32, bool) -> i32;
    pub type AddDisk3 =
        unsafe extern "C" fn(u32, *const c_char, *const c_char, u32, bool, bool, u32) -> i32;

    /// Function pointers copied out of the library (the signatures of libkrun 1.19's
    /// `include/libkrun.h`).
    #[derive(Clone)]
    pub struct Api {
        pub init_log: Option<InitLog>,
        pub create_ctx: CreateCtx,
        pub free_ctx: Ctx,
        pub set_vm_config: SetVmConfig,
        pub set_root: CtxPath,
        pub set_kernel: SetKernel,
        pub set_workdir: CtxPath,
        pub disable_implicit_vsock: Ctx,
        pub add_vsock: AddVsock,
        pub add_vsock_port2: AddVsockPort2,
        pub add_net_unixstream: AddNet,
        pub add_net_unixgram: AddNet,
        pub set_console_output: CtxPath,
        pub set_exec: SetExec,
        pub start_enter: Ctx,
        /// Only in libraries built with the `blk` feature; needed only for a state disk.
        pub add_disk3: Option<AddDisk3>,
        pub add_disk2: Option<AddDisk2>,
    }

    fn sym<T: Copy>(
        lib: &'static libloading::Library,
        origin: &Origin,
        symbol: &'static str,
    ) -> Result<T, LibkrunError> {
        // SAFETY: every caller names T as the C signature of `symbol` in libkrun.h; the library
        // is leaked, so the pointer outlives every use.
        unsafe { lib.get::<T>(symbol.as_bytes()) }
            .map(|s| *s)
            .map_err(|source| LibkrunError::Symbol {
                origin: origin.clone(),
                symbol,
                source,
            })
    }

    pub fn load(origin: &Origin) -> Result<&'static Api, LibkrunError> {
        let name: &std::ffi::OsStr = match origin {
            Origin::Flag(p) | Origin::Env(p) => p.as_os_str(),
            Origin::Loader => PLATFORM_NAME.as_ref(),
        };
        // SAFETY: loading runs the library's initialisers; libkrun's only set up Rust statics.
        let lib =
            unsafe { libloading::Library::new(name) }.map_err(|source| LibkrunError::Load {
                origin: origin.clone(),
                source,
            })?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        let api = Api {
            create_ctx: sym(lib, origin, "krun_create_ctx")?,
            init_log: sym(lib, origin, "krun_init_log").ok(),
            free_ctx: sym(lib, origin, "krun_free_ctx")?,
            set_vm_config: sym(lib, origin, "krun_set_vm_config")?,
            set_root: sym(lib, origin, "krun_set_root")?,
            set_kernel: sym(lib, origin, "krun_set_kernel")?,
            set_workdir: sym(lib, origin, "krun_set_workdir")?,
            disable_implicit_vsock: sym(lib, origin, "krun_disable_implicit_vsock")?,
            add_vsock: sym(lib, origin, "krun_add_vsock")?,
            add_vsock_port2: sym(lib, origin, "krun_add_vsock_port2")?,
            add_net_unixstream: sym(lib, origin, "krun_add_net_unixstream")?,
            add_net_unixgram: sym(lib, origin, "krun_add_net_unixgram")?,
            set_console_output: sym(lib, origin, "krun_set_console_output")?,
            set_exec: sym(lib, origin, "krun_set_exec")?,
            start_enter: sym(lib, origin, "krun_start_enter")?,
            add_disk3: sym(lib, origin, "krun_add_disk3").ok(),
            add_disk2: sym(lib, origin, "krun_add_disk2").ok(),
        };
        Ok(Box::leak(Box::new(api)))
    }
}

/// Turns a libkrun return code (negative errno on failure) into a result naming the call.
fn check(call: &'static str, ret: i32) -> Result<i32, LibkrunError> {
    if ret < 0 {
        Err(LibkrunError::Call {
            call,
            errno: nix::errno::Errno::from_raw(-ret),
        })
    } else {
        Ok(ret)
    }
}

fn cstring(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, LibkrunError> {
    CString::new(s).map_err(|source| LibkrunError::Nul { what, source })
}

fn cpath(what: &'static str, p: &Path) -> Result<CString, LibkrunError> {
    use std::os::unix::ffi::OsStrExt;
    cstring(what, p.as_os_str().as_bytes())
}

/// The guest's network device and the socket behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// Stream framing: passt, or gvproxy `-listen-qemu`.
    UnixStream(PathBuf),
    /// Datagram framing with the vfkit greeting: gvproxy `-listen-vfkit` (macOS).
    VfkitDatagram(PathBuf),
}

/// Everything a libkrun VM needs besides the [`VmSpec`]: libkrun serves the root directory and
/// the vsock itself.
#[derive(Debug, Clone)]
pub struct Vm<'a> {
    pub spec: &'a VmSpec,
    pub rootfs: &'a Path,
    /// Unix socket the host listens on; libkrun dials it when the guest connects to the boot
    /// channel port.
    pub channel_socket: &'a Path,
    /// Unix socket libkrun listens on and forwards to the guest's exec service port (host-initiated
    /// connections, which libkrun has no `CONNECT` handshake for).
    pub exec_socket: &'a Path,
    pub net: Option<Net>,
}

/// How the state disk is attached: `krun_add_disk3` with our sync mode, else `krun_add_disk2`,
/// which in libkrun 1.19 applies the same mode per OS.
#[derive(Clone, Copy)]
enum DiskCall {
    Disk3(ffi::AddDisk3),
    Disk2(ffi::AddDisk2),
}

/// The guest environment. `KRUN_INIT_PID1=1` keeps any libkrun init from forking our init; an
/// explicit list also matters because a NULL one makes libkrun copy the whole host environment
/// onto the kernel command line, which overflows it.
pub const GUEST_ENV: [&str; 4] = [
    "KRUN_INIT_PID1=1",
    "HOME=/root",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM=xterm",
];

/// The init libkrun is told to run (also named by `init=` on our command line).
pub const INIT: &str = "/sbin/openshell-init";

/// Our kernel command line with what differs under libkrun: the console is virtio-console
/// `hvc0`, the root virtio-fs tag is `/dev/root`, and reboot goes through the keyboard
/// controller, which libkrun turns into the VMM's exit.
pub fn adapt_cmdline(line: &str) -> String {
    line.split(' ')
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w.starts_with("console=") {
                "console=hvc0"
            } else if w.starts_with("root=") {
                "root=/dev/root"
            } else if w.starts_with("reboot=") {
                "reboot=k"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The kernel file and `krun_set_kernel` format: the ELF `vmlinux` on x86_64 (a `bzImage` path is
/// swapped for the `vmlinux` next to it, as `cargo xtask kernel` lays them out), the raw `Image`
/// on aarch64.
pub fn kernel(arch: Arch, path: &Path) -> Result<(PathBuf, u32), LibkrunError> {
    match arch {
        Arch::Aarch64 => Ok((path.to_path_buf(), KERNEL_FORMAT_RAW)),
        Arch::X86_64 => {
            if is_elf(path)? {
                return Ok((path.to_path_buf(), KERNEL_FORMAT_ELF));
            }
            let sibling = path.with_file_name("vmlinux");
            if sibling.is_file() && is_elf(&sibling)? {
                return Ok((sibling, KERNEL_FORMAT_ELF));
            }
            Err(LibkrunError::NoElfKernel {
                given: path.to_path_buf(),
                sibling,
            })
        }
    }
}

fn is_elf(path: &Path) -> Result<bool, LibkrunError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| LibkrunError::Kernel {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(read == 4 && magic == *b"\x7fELF")
}

/// `5a:94:...` as six bytes.
fn mac_bytes(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A loaded libkrun.
#[derive(Clone)]
pub struct Libkrun {
    api: &'static ffi::Api,
    pub origin: Origin,
}

impl std::fmt::Debug for Libkrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Libkrun({})", self.origin)
    }
}

/// libkrun's logger can be installed once per process (a second install panics inside it).
static LOG_INIT: std::sync::Once = std::sync::Once::new();

impl Libkrun {
    /// Loads the library from the first place of the search order and resolves every symbol.
    pub fn load(flag: Option<&Path>) -> Result<Self, LibkrunError> {
        Self::load_from(&Origin::find(flag))
    }

    pub fn load_from(origin: &Origin) -> Result<Self, LibkrunError> {
        Ok(Self {
            api: ffi::load(origin)?,
            origin: origin.clone(),
        })
    }

    /// Creates a context and makes every configuration call; the context is ready for
    /// [`Context::start`].
    pub fn configure(&self, vm: &Vm<'_>) -> Result<Context, LibkrunError> {
        let api = self.api;
        // Everything is converted before the first call, so a bad string cannot leave a
        // half-configured context behind.
        let c = Converted::new(vm)?;
        let disk = match (&c.disk, api.add_disk3, api.add_disk2) {
            (None, _, _) => None,
            (Some(_), Some(f), _) => Some(DiskCall::Disk3(f)),
            (Some(_), None, Some(f)) => Some(DiskCall::Disk2(f)),
            (Some(_), None, None) => return Err(LibkrunError::NoDisk(self.origin.clone())),
        };
        if let Some(init_log) = api.init_log {
            LOG_INIT.call_once(|| {
                // SAFETY: plain integers. -1: stderr (the child points fd 2 at the VMM log);
                // level 1 = errors; style 0 = auto; option 1 = ignore RUST_LOG.
                let _ = unsafe { init_log(-1, 1, 0, 1) };
            });
        }
        // SAFETY: no arguments.
        let id = check("krun_create_ctx", unsafe { (api.create_ctx)() })? as u32;
        // From here on the context is freed on every error path by Context's Drop.
        let mut ctx = Context {
            api,
            id,
            calls: vec!["krun_create_ctx"],
        };
        ctx.make_calls(&c, disk)?;
        Ok(ctx)
    }
}

/// Every argument of the configuration calls as C data, made before the first call.
struct Converted {
    root: CString,
    kernel: CString,
    kernel_format: u32,
    cmdline: CString,
    workdir: CString,
    channel: CString,
    exec: CString,
    console: CString,
    init: CString,
    /// The guest environment; `envp` points into it.
    _env: Vec<CString>,
    envp: Vec<*const std::ffi::c_char>,
    /// (socket, vfkit framing)
    net: Option<(CString, bool)>,
    mac: [u8; 6],
    cpus: u8,
    memory_mib: u32,
    /// (block id, image)
    disk: Option<(CString, CString)>,
}

impl Converted {
    fn new(vm: &Vm<'_>) -> Result<Self, LibkrunError> {
        let spec = vm.spec;
        let (kernel_path, kernel_format) = kernel(spec.arch, &spec.kernel)?;
        let env: Vec<CString> = GUEST_ENV
            .iter()
            .map(|e| cstring("guest environment", *e))
            .collect::<Result<_, _>>()?;
        let mut envp: Vec<*const std::ffi::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let net = match &vm.net {
            Some(Net::UnixStream(p)) => Some((cpath("network socket", p)?, false)),
            Some(Net::VfkitDatagram(p)) => Some((cpath("network socket", p)?, true)),
            None => None,
        };
        let disk = match &spec.state_disk {
            Some(p) => Some((
                cstring("state disk block id", STATE_DISK_SERIAL)?,
                cpath("state disk image", p)?,
            )),
            None => None,
        };
        Ok(Self {
            root: cpath("root directory", vm.rootfs)?,
            kernel: cpath("kernel path", &kernel_path)?,
            kernel_format,
            cmdline: cstring("kernel command line", adapt_cmdline(&spec.cmdline))?,
            workdir: cstring("workdir", "/")?,
            channel: cpath("boot channel socket", vm.channel_socket)?,
            exec: cpath("exec socket", vm.exec_socket)?,
            console: cpath("console log", &spec.console_log)?,
            init: cstring("init path", INIT)?,
            _env: env,
            envp,
            net,
            mac: mac_bytes(GUEST_MAC).ok_or(LibkrunError::Call {
                call: "parse GUEST_MAC",
                errno: nix::errno::Errno::EINVAL,
            })?,
            cpus: u8::try_from(spec.cpus).map_err(|_| LibkrunError::Call {
                call: "krun_set_vm_config (more than 255 vCPUs)",
                errno: nix::errno::Errno::EINVAL,
            })?,
            memory_mib: spec.memory_mib,
            disk,
        })
    }
}

impl Context {
    /// Checks a call's result and notes that it was made.
    fn call(&mut self, name: &'static str, ret: i32) -> Result<i32, LibkrunError> {
        self.calls.push(name);
        check(name, ret)
    }

    /// The configuration calls, in the order the old system made them.
    fn make_calls(&mut self, c: &Converted, disk: Option<DiskCall>) -> Result<(), LibkrunError> {
        let (api, id) = (self.api, self.id);
        let argv: [*const std::ffi::c_char; 1] = [std::ptr::null()];
        // SAFETY (all calls below): `id` is a live context; every pointer is a NUL-terminated
        // string or array owned by `c` or this function that outlives the call (libkrun copies
        // what it keeps); the arrays end with NULL; the MAC points at 6 bytes.
        unsafe {
            self.call(
                "krun_set_vm_config",
                (api.set_vm_config)(id, c.cpus, c.memory_mib),
            )?;
            self.call("krun_set_root", (api.set_root)(id, c.root.as_ptr()))?;
            if let (Some((block, image)), Some(f)) = (&c.disk, disk) {
                // Read-write, no O_DIRECT (macOS has none; the guest's flushes are what count).
                match f {
                    DiskCall::Disk3(f) => self.call(
                        "krun_add_disk3",
                        f(
                            id,
                            block.as_ptr(),
                            image.as_ptr(),
                            DISK_FORMAT_RAW,
                            false,
                            false,
                            DISK_SYNC,
                        ),
                    )?,
                    DiskCall::Disk2(f) => self.call(
                        "krun_add_disk2",
                        f(id, block.as_ptr(), image.as_ptr(), DISK_FORMAT_RAW, false),
                    )?,
                };
            }
            self.call(
                "krun_set_kernel",
                (api.set_kernel)(
                    id,
                    c.kernel.as_ptr(),
                    c.kernel_format,
                    std::ptr::null(),
                    c.cmdline.as_ptr(),
                ),
            )?;
            self.call(
                "krun_set_workdir",
                (api.set_workdir)(id, c.workdir.as_ptr()),
            )?;
            self.call(
                "krun_disable_implicit_vsock",
                (api.disable_implicit_vsock)(id),
            )?;
            // TSI off: the guest has a plain vsock device.
            self.call("krun_add_vsock", (api.add_vsock)(id, 0))?;
            // listen=false: the guest connects, libkrun dials our listening socket.
            self.call(
                "krun_add_vsock_port2",
                (api.add_vsock_port2)(
                    id,
                    openshell_shared::BOOT_CHANNEL_PORT,
                    c.channel.as_ptr(),
                    false,
                ),
            )?;
            // listen=true: libkrun listens on the socket and connects to the guest's port.
            self.call(
                "krun_add_vsock_port2",
                (api.add_vsock_port2)(id, openshell_shared::exec::EXEC_PORT, c.exec.as_ptr(), true),
            )?;
            self.add_net(c)?;
            self.call(
                "krun_set_console_output",
                (api.set_console_output)(id, c.console.as_ptr()),
            )?;
            self.call(
                "krun_set_exec",
                (api.set_exec)(id, c.init.as_ptr(), argv.as_ptr(), c.envp.as_ptr()),
            )?;
        }
        Ok(())
    }

    fn add_net(&mut self, c: &Converted) -> Result<(), LibkrunError> {
        let (api, id) = (self.api, self.id);
        // SAFETY: as in make_calls.
        unsafe {
            match &c.net {
                Some((path, false)) => self.call(
                    "krun_add_net_unixstream",
                    (api.add_net_unixstream)(
                        id,
                        path.as_ptr(),
                        -1,
                        c.mac.as_ptr(),
                        NET_FEATURES,
                        0,
                    ),
                )?,
                Some((path, true)) => self.call(
                    "krun_add_net_unixgram",
                    (api.add_net_unixgram)(
                        id,
                        path.as_ptr(),
                        -1,
                        c.mac.as_ptr(),
                        NET_FEATURES,
                        NET_FLAG_VFKIT,
                    ),
                )?,
                None => 0,
            };
        }
        Ok(())
    }
}

/// A configured libkrun context in this process, freed on drop.
pub struct Context {
    api: &'static ffi::Api,
    id: u32,
    /// The libkrun calls made on it so far, in order.
    pub calls: Vec<&'static str>,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `id` came from krun_create_ctx and is freed once, here.
        let _ = unsafe { (self.api.free_ctx)(self.id) };
    }
}

impl Context {
    /// Forks the VMM process: the child dies with this process (Linux), writes to `log`, and
    /// runs the VM in `krun_start_enter`, which exits the process with the guest's status. If it
    /// returns, the child writes the negative errno to `log` and exits with [`START_FAILED`].
    /// Must be called from the main thread: the parent-death signal fires when the forking
    /// thread exits. `keep` (the state disk's lock) stays open in the child as its fd 3, so the
    /// lock lasts as long as the VM. Returns the child's pid; the caller reaps it.
    pub fn start(self, log: &Path, keep: Option<RawFd>) -> Result<u32, LibkrunError> {
        // The parent's copy of the context is freed by Drop; the child owns its own copy.
        fork_vmm(log, self.api.start_enter, self.id, keep)
    }
}

/// Forks a child that runs `entry(id)` as described at [`Context::start`].
fn fork_vmm(
    log: &Path,
    entry: ffi::Ctx,
    id: u32,
    keep: Option<RawFd>,
) -> Result<u32, LibkrunError> {
    use std::os::fd::AsRawFd;
    {
        let open_err = |source| LibkrunError::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(open_err)?;
        let null = std::fs::File::open("/dev/null").map_err(open_err)?;
        let parent = std::process::id() as libc::pid_t;
        let (out_fd, null_fd) = (out.as_raw_fd(), null.as_raw_fd());
        // SAFETY: the child runs only child_main, which calls no Rust code that allocates or
        // unwinds before handing over to libkrun, and ends in _exit.
        match unsafe { libc::fork() } {
            -1 => Err(LibkrunError::Fork(nix::errno::Errno::last())),
            0 => child_main(parent, [out_fd, null_fd], keep, entry, id),
            pid => {
                crate::children::guard_child(pid as u32);
                Ok(pid as u32)
            }
        }
    }
}

/// The VMM child after fork: never returns into Rust code that could unwind.
fn child_main(
    parent: libc::pid_t,
    [out_fd, null_fd]: [RawFd; 2],
    keep: Option<RawFd>,
    start_enter: ffi::Ctx,
    id: u32,
) -> ! {
    // SAFETY: async-signal-safe libc calls on fds this process owns, then libkrun's entry point
    // on a context that fork copied, then _exit.
    unsafe {
        #[cfg(target_os = "linux")]
        {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                libc::_exit(START_FAILED);
            }
        }
        // The parent may have died before prctl: then nobody will signal us.
        if libc::getppid() != parent {
            libc::_exit(START_FAILED);
        }
        libc::dup2(null_fd, 0);
        libc::dup2(out_fd, 1);
        libc::dup2(out_fd, 2);
        // Nothing else the host had open belongs in the VMM (no exec follows, so CLOEXEC does
        // not apply): libkrun opens its devices, sockets and console inside krun_start_enter.
        // The one kept descriptor moves to 3 first.
        let first_closed = match keep {
            Some(fd) => {
                if fd != 3 && libc::dup2(fd, 3) != 3 {
                    libc::_exit(START_FAILED);
                }
                4u32
            }
            None => 3u32,
        };
        #[cfg(target_os = "linux")]
        libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32);
        #[cfg(not(target_os = "linux"))]
        let _ = first_closed;
        // `up` blocks its signals in every thread; the VMM must get them.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let ret = start_enter(id);
        let mut buf = [0u8; 64];
        let len = failure_message(ret, &mut buf);
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(START_FAILED);
    }
}

/// "openshell-host: krun_start_enter returned -N\n" into `buf` without allocating.
fn failure_message(ret: i32, buf: &mut [u8; 64]) -> usize {
    const PREFIX: &[u8] = b"openshell-host: krun_start_enter returned ";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut len = PREFIX.len();
    if ret < 0 {
        buf[len] = b'-';
        len += 1;
    }
    let mut digits = [0u8; 10];
    let mut n = ret.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[len..len + d.len()].copy_from_slice(d);
    len += d.len();
    buf[len] = b'\n';
    len + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The libkrun.so `cargo xtask test` built (`cargo xtask libkrun`). Its own variable, not
    /// OPENSHELL_LIBKRUN: the VM tests' hosts must not pick it up. Skips outside CI, fails in CI.
    fn built_library() -> Option<PathBuf> {
        const VAR: &str = "OPENSHELL_TEST_LIBKRUN";
        match std::env::var_os(VAR) {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                let why = format!(
                    "{VAR} is not set: libkrun tests run through `cargo xtask test` \
                     (or point it at the output of `cargo xtask libkrun`)"
                );
                assert!(std::env::var_os("CI").is_none(), "{why}");
                eprintln!("skipped: {why}");
                None
            }
        }
    }

    /// A VmSpec whose files are all fake: enough for every configuration call, which only
    /// records settings; `krun_start_enter` is the first to read the kernel.
    /// A VM description whose kernel no loader accepts, with its paths under `dir`.
    struct FakeVm {
        spec: VmSpec,
        rootfs: PathBuf,
        channel: PathBuf,
        exec: PathBuf,
    }

    impl FakeVm {
        fn new(dir: &Path, cpus: u32) -> Self {
            let kernel = dir.join("vmlinux");
            // ELF magic, then nothing a loader accepts.
            std::fs::write(&kernel, b"\x7fELF not a kernel").expect("kernel");
            let rootfs = dir.join("root");
            std::fs::create_dir_all(&rootfs).expect("rootfs");
            let spec = VmSpec {
                arch: Arch::host(),
                kernel,
                cmdline: crate::backend::spec::kernel_cmdline(Arch::host(), &[], None),
                memory_mib: 128,
                cpus,
                engine: crate::backend::spec::Engine::Kvm,
                virtiofs_socket: dir.join("unused-virtiofs.sock"),
                vsock_socket: dir.join("unused-vsock.sock"),
                console_log: dir.join("console.log"),
                net_socket: None,
                state_disk: None,
            };
            Self {
                spec,
                rootfs,
                channel: dir.join("vsock.sock_10700"),
                exec: dir.join("exec.sock"),
            }
        }

        fn vm(&self, net: Option<Net>) -> Vm<'_> {
            Vm {
                spec: &self.spec,
                rootfs: &self.rootfs,
                channel_socket: &self.channel,
                exec_socket: &self.exec,
                net,
            }
        }
    }

    #[test]
    fn cmdline_is_adapted_for_libkrun() {
        let ours = crate::backend::spec::kernel_cmdline(Arch::X86_64, &["/bin/true".into()], None);
        let line = adapt_cmdline(&ours);
        assert!(
            line.starts_with(
                "console=hvc0 rootfstype=virtiofs root=/dev/root rw \
                 init=/sbin/openshell-init panic=-1 reboot=k quiet"
            ),
            "{line}"
        );
        assert!(line.ends_with(" openshell.exec=/bin/true"), "{line}");
    }

    #[test]
    fn search_order_is_flag_then_env_then_loader() {
        let env = Some(std::ffi::OsString::from("/e/libkrun.so"));
        assert_eq!(
            Origin::pick(Some(Path::new("/f/libkrun.so")), env.clone()),
            Origin::Flag("/f/libkrun.so".into())
        );
        assert_eq!(Origin::pick(None, env), Origin::Env("/e/libkrun.so".into()));
        assert_eq!(Origin::pick(None, Some("".into())), Origin::Loader);
        assert_eq!(Origin::pick(None, None), Origin::Loader);
        assert!(Origin::Loader.to_string().contains(PLATFORM_NAME));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            mac_bytes(GUEST_MAC),
            Some([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee])
        );
        assert_eq!(mac_bytes("5a:94"), None);
        assert_eq!(mac_bytes("5a:94:ef:e4:0c:ee:00"), None);
        let mut buf = [0u8; 64];
        let n = failure_message(-22, &mut buf);
        assert_eq!(
            &buf[..n],
            b"openshell-host: krun_start_enter returned -22\n".as_slice()
        );
        let n = failure_message(i32::MIN, &mut buf);
        assert!(std::str::from_utf8(&buf[..n])
            .expect("ascii")
            .ends_with("-2147483648\n"));
        // The compat offload set of spec 2.2.
        assert_eq!(NET_FEATURES, 0b100_1100_1000_0011);
    }

    #[test]
    fn kernel_format_per_arch() {
        let tmp = tempfile::tempdir().expect("tmp");
        let bz = tmp.path().join("bzImage");
        std::fs::write(&bz, b"MZ not elf").expect("bz");
        let err = kernel(Arch::X86_64, &bz).unwrap_err();
        assert!(
            matches!(&err, LibkrunError::NoElfKernel { sibling, .. } if sibling.ends_with("vmlinux")),
            "{err}"
        );
        std::fs::write(tmp.path().join("vmlinux"), b"\x7fELF...").expect("vmlinux");
        assert_eq!(
            kernel(Arch::X86_64, &bz).expect("sibling"),
            (tmp.path().join("vmlinux"), KERNEL_FORMAT_ELF)
        );
        let image = tmp.path().join("Image");
        assert_eq!(
            kernel(Arch::Aarch64, &image).expect("raw"),
            (image, KERNEL_FORMAT_RAW)
        );
        let gone = kernel(Arch::X86_64, &tmp.path().join("nothing")).unwrap_err();
        assert!(matches!(gone, LibkrunError::Kernel { .. }), "{gone}");
    }

    #[test]
    fn missing_library_names_the_path_and_where_it_came_from() {
        let err = Libkrun::load(Some(Path::new("/nonexistent/dir/libkrun.so"))).unwrap_err();
        assert!(matches!(err, LibkrunError::Load { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/dir/libkrun.so (--libkrun)"),
            "{msg}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn library_without_the_api_names_the_missing_symbol() {
        let err = Libkrun::load_from(&Origin::Flag("libc.so.6".into())).unwrap_err();
        assert!(
            matches!(
                err,
                LibkrunError::Symbol {
                    symbol: "krun_create_ctx",
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("libc.so.6") && msg.contains("krun_create_ctx"),
            "{msg}"
        );
    }

    #[test]
    fn every_configuration_call_succeeds_on_the_real_library() {
        let Some(lib) = built_library() else { return };
        let krun = Libkrun::load(Some(&lib)).expect("load the built libkrun");
        let tmp = tempfile::tempdir().expect("tmp");
        let fake = FakeVm::new(tmp.path(), 2);
        for net in [
            None,
            Some(Net::UnixStream(tmp.path().join("passt.sock"))),
            Some(Net::VfkitDatagram(tmp.path().join("gvproxy.sock"))),
        ] {
            let vm = fake.vm(net);
            let ctx = krun.configure(&vm).expect("configure");
            drop(ctx);
        }
    }

    /// The call sequence on the real library: the state disk right after the root, through
    /// krun_add_disk3 (the library `cargo xtask libkrun` builds has the `blk` feature); without
    /// a disk no disk call at all.
    #[test]
    fn the_state_disk_is_added_after_the_root() {
        let Some(lib) = built_library() else { return };
        let krun = Libkrun::load(Some(&lib)).expect("load the built libkrun");
        let tmp = tempfile::tempdir().expect("tmp");
        let mut fake = FakeVm::new(tmp.path(), 1);
        let plain = krun.configure(&fake.vm(None)).expect("configure");
        assert!(
            !plain.calls.iter().any(|c| c.starts_with("krun_add_disk")),
            "{:?}",
            plain.calls
        );
        fake.spec.state_disk = Some(tmp.path().join("state.img"));
        let ctx = krun
            .configure(&fake.vm(None))
            .expect("configure with a disk");
        assert_eq!(
            ctx.calls[..4],
            [
                "krun_create_ctx",
                "krun_set_vm_config",
                "krun_set_root",
                "krun_add_disk3"
            ]
        );
        assert_eq!(ctx.calls.last(), Some(&"krun_set_exec"));
        assert_eq!(ctx.calls.len(), plain.calls.len() + 1);
        assert_eq!(DISK_SYNC, if cfg!(target_os = "macos") { 1 } else { 2 });
    }

    /// A library without the disk calls cannot attach the disk: named before any call is made.
    #[test]
    fn a_library_without_disk_calls_is_named() {
        let Some(lib) = built_library() else { return };
        let mut krun = Libkrun::load(Some(&lib)).expect("load the built libkrun");
        let mut api = krun.api.clone();
        (api.add_disk3, api.add_disk2) = (None, None);
        krun.api = Box::leak(Box::new(api));
        let tmp = tempfile::tempdir().expect("tmp");
        let mut fake = FakeVm::new(tmp.path(), 1);
        fake.spec.state_disk = Some(tmp.path().join("state.img"));
        let err = krun.configure(&fake.vm(None)).err().expect("no disk calls");
        assert!(matches!(err, LibkrunError::NoDisk(_)), "{err}");
        assert!(err.to_string().contains("--no-state-disk"), "{err}");
    }

    #[test]
    fn a_failing_call_is_named_with_its_errno() {
        let Some(lib) = built_library() else { return };
        let krun = Libkrun::load(Some(&lib)).expect("load the built libkrun");
        let tmp = tempfile::tempdir().expect("tmp");
        let fake = FakeVm::new(tmp.path(), 0);
        let vm = fake.vm(None);
        let err = krun.configure(&vm).err().expect("0 vCPUs is refused");
        assert!(
            matches!(
                err,
                LibkrunError::Call {
                    call: "krun_set_vm_config",
                    errno: nix::errno::Errno::EINVAL
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("krun_set_vm_config failed: EINVAL"));
    }

    fn wait_with_deadline(pid: nix::unistd::Pid, limit: Duration) -> nix::sys::wait::WaitStatus {
        let deadline = Instant::now() + limit;
        loop {
            match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    if Instant::now() >= deadline {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(pid, None);
                        panic!("child {pid} did not exit within {limit:?}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(s) => return s,
                Err(e) => panic!("waitpid: {e}"),
            }
        }
    }

    unsafe extern "C" fn fails_with_eio(_: u32) -> i32 {
        -libc::EIO
    }

    unsafe extern "C" fn runs_forever(_: u32) -> i32 {
        loop {
            libc::pause();
        }
    }

    /// The child's path without libkrun: an entry point that returns is reported in the log and
    /// as START_FAILED.
    #[test]
    fn child_reports_an_entry_point_that_returns() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("vmm.log");
        let pid = fork_vmm(&log, fails_with_eio, 7, None).expect("fork");
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let status = wait_with_deadline(pid, Duration::from_secs(10));
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(pid, START_FAILED)
        );
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "openshell-host: krun_start_enter returned -5\n"
        );
    }

    /// The state disk's lock given to the child stays held by it after the host lets go, and is
    /// free once the child is gone.
    #[test]
    fn the_vmm_child_keeps_the_disk_lock() {
        use crate::lifecycle::state::StateDir;
        use crate::lifecycle::state_disk;
        let tmp = tempfile::tempdir().expect("tmp");
        let sdir = StateDir::at("t", tmp.path().join("t"));
        sdir.create().expect("state dir");
        let lock = state_disk::lock(&sdir).expect("lock");
        let log = tmp.path().join("vmm.log");
        let pid = fork_vmm(&log, runs_forever, 0, Some(lock.raw_fd())).expect("fork");
        drop(lock);
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let held = state_disk::lock(&sdir);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        assert!(
            matches!(held, Err(state_disk::StateDiskError::Busy { .. })),
            "{held:?}"
        );
        state_disk::lock(&sdir).expect("free once the VMM is gone");
    }

    /// A VMM child whose host is SIGKILLed dies too (PR_SET_PDEATHSIG).
    #[cfg(target_os = "linux")]
    #[test]
    fn vmm_child_dies_with_its_host() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("vmm.log");
        crate::children::assert_dies_with_killed_host("VMM", || {
            fork_vmm(&log, runs_forever, 0, None)
                .ok()
                .map(|pid| pid as i32)
        });
    }

    /// KVM cannot run full guests on these machines, so the child is given a kernel that does
    /// not load: krun_start_enter must fail, and the child must say so and exit with
    /// START_FAILED, which the parent sees.
    #[test]
    fn forked_child_reports_a_failed_start() {
        let Some(lib) = built_library() else { return };
        let krun = Libkrun::load(Some(&lib)).expect("load the built libkrun");
        let tmp = tempfile::tempdir().expect("tmp");
        let fake = FakeVm::new(tmp.path(), 1);
        let vm = fake.vm(None);
        let log = tmp.path().join("libkrun.log");
        let pid = krun
            .configure(&vm)
            .expect("configure")
            .start(&log, None)
            .expect("fork");
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let status = wait_with_deadline(pid, Duration::from_secs(30));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("VMM log:\n{text}");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(pid, START_FAILED),
            "log: {text}"
        );
        assert!(
            text.contains("openshell-host: krun_start_enter returned -"),
            "log: {text}"
        );
    }
}
