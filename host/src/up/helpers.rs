//! The helper daemons next to the VMM: the user-mode network (passt or gvproxy) and, for qemu,
//! the vhost-user daemons (virtio-fs, vsock). Their arguments come from their own modules
//! (`net::passt`, `net::gvproxy`, `backend::qemu`); this one starts them and waits for their
//! sockets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::args::UpArgs;
use super::error::UpError;
use crate::backend::qemu;
use crate::backend::Chosen;
use crate::children::Helper;
use crate::net::choice::Network;
use crate::net::gvproxy::{self, Framing};
use crate::net::{passt, Forward, NetBackend};
use crate::rundir::RunDir;

/// Starts the network helper and, for qemu, the vhost-user helpers, and waits for their sockets.
/// Each joins `helpers` once started, so it is stopped on every way out. Returns the socket the
/// VM's network device connects to, if it has one.
pub fn start(
    args: &UpArgs,
    network: &Network,
    dir: &RunDir,
    backend: &Chosen,
    forwards: &[Forward],
    helpers: &mut Vec<Helper>,
) -> Result<Option<PathBuf>, UpError> {
    let net = start_network(args, network, dir, backend, forwards)?;
    let vhost = if matches!(backend, Chosen::Qemu) {
        start_vhost_helpers(args, dir, helpers)
    } else {
        Ok(())
    };
    let net_socket = net.map(|n| n.ready(helpers)).transpose()?;
    vhost?;
    Ok(net_socket)
}

/// A network helper started but not yet known to listen.
struct NetHelper {
    helper: Helper,
    socket: PathBuf,
    within: Duration,
}

/// Starts the helper of the chosen `network` (none for `--net none`). It is not waited for
/// here: the vhost-user helpers start while it comes up, since each takes milliseconds to create
/// its socket and waiting for them one after the other adds up.
fn start_network(
    args: &UpArgs,
    network: &Network,
    dir: &RunDir,
    backend: &Chosen,
    forwards: &[Forward],
) -> Result<Option<NetHelper>, UpError> {
    Ok(match network.backend {
        NetBackend::None => None,
        NetBackend::Passt => {
            let (_, socket) = passt::socket_dir(&dir.path)?;
            let mut cmd = Command::new(&args.passt);
            cmd.args(passt::args(&socket, forwards, &args.host_ports));
            let helper = Helper::spawn("passt", cmd, &dir.path.join("passt.log"))?;
            Some(NetHelper {
                helper,
                socket,
                within: Duration::from_secs(10),
            })
        }
        NetBackend::Gvproxy => {
            let (socket, api) = (dir.gvproxy_socket(), dir.gvproxy_api_socket());
            let program = network.gvproxy.as_deref().unwrap_or(Path::new("gvproxy"));
            let mut cmd = Command::new(program);
            cmd.args(gvproxy::args(gvproxy_framing(backend), &socket, &api));
            let helper = Helper::spawn("gvproxy", cmd, &dir.path.join("gvproxy.log"))?;
            Some(NetHelper {
                helper,
                socket,
                within: Duration::from_secs(5),
            })
        }
    })
}

impl NetHelper {
    /// Waits for the helper's socket; the helper joins `helpers` either way, so it is stopped
    /// on every way out. Returns the socket the VM's network device connects to.
    fn ready(mut self, helpers: &mut Vec<Helper>) -> Result<PathBuf, UpError> {
        let ready = self.helper.wait_for_socket(&self.socket, self.within);
        helpers.push(self.helper);
        ready?;
        Ok(self.socket)
    }
}

/// virtio-fs and vsock daemons for qemu's vhost-user devices (libkrun has its own). Both join
/// `helpers` before either failure is returned.
fn start_vhost_helpers(
    args: &UpArgs,
    dir: &RunDir,
    helpers: &mut Vec<Helper>,
) -> Result<(), UpError> {
    let mut virtiofsd = Command::new(&args.virtiofsd);
    virtiofsd.args(qemu::virtiofsd_args(
        &dir.virtiofs_socket(),
        args.rootfs_path(),
    ));
    let mut fs = Helper::spawn("virtiofsd", virtiofsd, &dir.path.join("virtiofsd.log"))?;
    let mut vsock = Command::new(&args.vsock_helper);
    vsock.args(qemu::vsock_helper_args(
        &dir.vsock_vhost_socket(),
        &dir.vsock_uds(),
    ));
    let vsock = Helper::spawn("vhost-device-vsock", vsock, &dir.path.join("vsock.log"));
    let fs_ready = fs.wait_for_socket(&dir.virtiofs_socket(), Duration::from_secs(10));
    helpers.push(fs);
    let mut vsock = vsock?;
    let vsock_ready = vsock.wait_for_socket(&dir.vsock_vhost_socket(), Duration::from_secs(10));
    helpers.push(vsock);
    fs_ready?;
    vsock_ready?;
    Ok(())
}

/// gvproxy's framing: libkrun on macOS speaks vfkit's datagrams (with offloads, much faster);
/// everything else qemu's stream framing.
pub fn gvproxy_framing(backend: &Chosen) -> Framing {
    if cfg!(target_os = "macos") && matches!(backend, Chosen::Libkrun(_)) {
        Framing::VfkitDatagram
    } else {
        Framing::QemuStream
    }
}
