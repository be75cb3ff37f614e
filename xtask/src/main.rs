//! cargo xtask: builds the guest kernel, openshell-init and root filesystems, boots the VM, and
//! runs the test suite and benchmarks. See README.md for the two commands that matter.

mod bench;
mod bench_chart;
mod bench_dhcp;
mod bench_host;
mod bench_kine;
mod bench_profile;
mod bench_state;
mod cache;
mod gateway;
mod k3s;
mod kernel;
mod libkrun;
mod progress;
mod rootfs;
mod test;
mod test_gateway;
mod tools;
mod up;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Parser, Subcommand};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn msg(text: impl Into<String>) -> Self {
        Error::Msg(text.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub use openshell_shared::Arch;

/// Names the kernel build and Debian use for an architecture.
pub trait BuildNames {
    fn kernel_arch(self) -> &'static str;
    fn cross_prefix(self) -> &'static str;
    fn debian(self) -> &'static str;
}

impl BuildNames for Arch {
    fn kernel_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
        }
    }
    fn cross_prefix(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu-",
            Arch::Aarch64 => "aarch64-linux-gnu-",
        }
    }
    fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
}

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest kernel (cached by input hash); prints its directory.
    Kernel {
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
    },
    /// Build openshell-init for the guest; prints the binary's path.
    Init {
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
    },
    /// Build a guest root filesystem (cached by input hash); prints its directory.
    Rootfs {
        #[arg(long, default_value = "base")]
        profile: String,
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
        /// Also copy the tree here, for a boot that writes to it.
        #[arg(long)]
        copy_to: Option<PathBuf>,
        #[command(flatten)]
        gateway: gateway::Inputs,
    },
    /// Install vhost-device-vsock into the cache; prints its path.
    VsockHelper,
    /// Build libkrun's shared library from crates.io into the cache; prints its path.
    Libkrun,
    /// Build whatever is missing for one arch and print the artifact paths.
    Artifacts {
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
        #[arg(long)]
        json: bool,
    },
    /// Build what is missing and boot the VM (README's first command).
    Up(up::UpArgs),
    /// Run every test (README's second command).
    Test(test::TestArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Kernel { arch } => kernel::build(arch).map(|p| println!("{}", p.display())),
        Cmd::Init { arch } => tools::init(arch).map(|p| println!("{}", p.display())),
        Cmd::Rootfs {
            profile,
            arch,
            copy_to,
            gateway,
        } => rootfs_cmd(&profile, arch, copy_to, &gateway),
        Cmd::VsockHelper => tools::vsock_helper().map(|p| println!("{}", p.display())),
        Cmd::Libkrun => libkrun::build().map(|p| println!("{}", p.display())),
        Cmd::Artifacts { arch, json } => artifacts(arch).map(|a| {
            if json {
                println!("{}", a.to_json());
            } else {
                println!(
                    "kernel {}\nrootfs {}\ninit {}\nvsock_helper {}",
                    a.kernel.display(),
                    a.rootfs.display(),
                    a.init.display(),
                    a.vsock_helper.display()
                );
            }
        }),
        Cmd::Up(args) => up::run(args).map(|code| std::process::exit(code)),
        Cmd::Test(args) => test::run(args),
        Cmd::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}

fn rootfs_cmd(
    profile: &str,
    arch: Arch,
    copy_to: Option<PathBuf>,
    inputs: &gateway::Inputs,
) -> Result<()> {
    let root = match profile {
        "base" => {
            if inputs.given() {
                return Err(Error::msg(
                    "--k3s and --images are for the gateway profile (--profile gateway)",
                ));
            }
            rootfs::build_base(arch, &tools::init(arch)?)?
        }
        "gateway" => gateway::build(arch, || tools::init(arch), inputs)?.root,
        other => {
            return Err(Error::msg(format!(
                "unknown profile `{other}`: `base` or `gateway`"
            )))
        }
    };
    if let Some(dest) = copy_to {
        rootfs::copy_tree(&root, &dest)?;
        println!("{}", dest.display());
    } else {
        println!("{}", root.display());
    }
    Ok(())
}

/// Everything one boot needs.
pub struct Artifacts {
    pub kernel: PathBuf,
    pub vmlinux: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub init: PathBuf,
    pub vsock_helper: PathBuf,
}

impl Artifacts {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "kernel": self.kernel,
            "vmlinux": self.vmlinux,
            "rootfs": self.rootfs,
            "init": self.init,
            "vsock_helper": self.vsock_helper,
        })
        .to_string()
    }
}

pub fn artifacts(arch: Arch) -> Result<Artifacts> {
    let kdir = kernel::build(arch)?;
    let init = tools::init(arch)?;
    let rootfs = rootfs::build_base(arch, &init)?;
    let vsock_helper = tools::vsock_helper()?;
    let (kernel, vmlinux) = match arch {
        Arch::X86_64 => (kdir.join("bzImage"), Some(kdir.join("vmlinux"))),
        Arch::Aarch64 => (kdir.join("Image"), None),
    };
    Ok(Artifacts {
        kernel,
        vmlinux,
        rootfs,
        init,
        vsock_helper,
    })
}

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Runs a command to completion, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| Error::msg(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::msg(format!("{} failed ({status})", describe(cmd))))
    }
}

/// Runs a command and returns its stdout.
pub fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::msg(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
