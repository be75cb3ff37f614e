//! cargo xtask: builds the guest kernel, openshell-init and root filesystems, boots the VM, and
//! runs the test suite and benchmarks. See README.md for the two commands that matter.
//! This file is the command line and its dispatch only: each command's work is in the module
//! named for it.

mod artifacts;
mod bench;
mod build_names;
mod bundle;
mod cache;
mod containerd_root;
#[cfg(test)]
mod doc_links;
mod elf;
mod error;
mod fixtures;
mod gateway;
mod image_archive;
mod k3s;
mod kernel;
#[cfg(test)]
mod layering;
mod libkrun;
mod paths;
mod payload;
mod peers;
mod process;
mod progress;
mod rootfs;
mod sign;
mod test;
mod tools;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use openshell_shared::Arch;

use crate::error::{Error, Result};

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
        /// This openshell-init binary instead of building one (the test's second build).
        #[arg(long, value_name = "FILE")]
        init: Option<PathBuf>,
        #[command(flatten)]
        gateway: gateway::Inputs,
        #[command(flatten)]
        payload: payload::Args,
    },
    /// Install vhost-device-vsock into the cache; prints its path.
    VsockHelper,
    /// Build libkrun's shared library from crates.io into the cache; prints its path.
    Libkrun,
    /// Build gvproxy and kine from their Go modules (pinned, cached); prints their paths.
    Peers,
    /// Build whatever is missing for one arch and print the artifact paths.
    Artifacts {
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
        #[arg(long)]
        json: bool,
    },
    /// Build one arch's kernel, root and init into one bundle file (docs/bundle.md); prints its
    /// path.
    Bundle(bundle::BundleArgs),
    /// Build what is missing and boot the VM (README's first command).
    Up(up::UpArgs),
    /// Run every test (README's second command).
    Test(test::TestArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// macOS: sign openshell-host with the hypervisor entitlement (elsewhere: says so, exit 0).
    Sign(sign::SignArgs),
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
            init,
            gateway,
            payload,
        } => rootfs_cmd(&profile, arch, copy_to, init, &gateway, &payload),
        Cmd::VsockHelper => tools::vsock_helper().map(|p| println!("{}", p.display())),
        Cmd::Libkrun => libkrun::build().map(|p| println!("{}", p.display())),
        Cmd::Peers => [peers::GVPROXY, peers::KINE].iter().try_for_each(|p| {
            p.build()
                .map(|path| println!("{} {}", p.name, path.display()))
        }),
        Cmd::Artifacts { arch, json } => artifacts::artifacts(arch).map(|a| {
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
        Cmd::Bundle(args) => bundle::run(args),
        Cmd::Up(args) => up::run(args).map(|code| std::process::exit(code)),
        Cmd::Test(args) => test::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Sign(args) => sign::run_sign(&args),
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
    init: Option<PathBuf>,
    inputs: &gateway::Inputs,
    payload: &payload::Args,
) -> Result<()> {
    let init = || match &init {
        Some(given) => Ok(given.clone()),
        None => tools::init(arch),
    };
    let root = match profile {
        "base" => {
            if inputs.given() || payload.given() {
                return Err(Error::msg(
                    "--k3s, --state-db, --chart, --images and --sandbox-bin are for the gateway profile (--profile gateway)",
                ));
            }
            rootfs::build_base(arch, &init()?)?
        }
        "gateway" => gateway::build_with(arch, init, inputs, payload)?.root,
        containerd_root::PROFILE => {
            if inputs.given() || payload.given() {
                return Err(Error::msg(format!(
                    "--k3s, --state-db, --chart, --images and --sandbox-bin are for the gateway profile, not {}",
                    containerd_root::PROFILE
                )));
            }
            containerd_root::build(arch, init)?
        }
        other => {
            return Err(Error::msg(format!(
                "unknown profile `{other}`: `base`, `gateway` or `{}`",
                containerd_root::PROFILE
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
