//! k3s's layout on the guest's disk, and that of the containerd and CNI plugins it runs: every
//! path init reads, writes, links or cleans there, named once. Paths are guest-absolute (join
//! them to a root with `Ctx::path` or `guest_path::under`); which of them a phase touches, and
//! why, stays with the phase.

/// k3s's data directory (its `--data-dir` default): server, agent and extracted binaries.
pub const K3S_ROOT: &str = "/var/lib/rancher/k3s";
/// Where k3s self-extracts its binaries, one `<hash>` directory per k3s build.
pub const K3S_DATA_DIR: &str = "/var/lib/rancher/k3s/data";
/// Auto-deploy: k3s applies every manifest here and redeploys one whose file changed.
pub const K3S_MANIFESTS: &str = "/var/lib/rancher/k3s/server/manifests";
/// Charts that HelmChart manifests refer to, served by k3s itself.
pub const K3S_CHARTS: &str = "/var/lib/rancher/k3s/server/static/charts";
/// The agent's directory: containerd's content, snapshots and metadata, the airgap images.
pub const K3S_AGENT: &str = "/var/lib/rancher/k3s/agent";
/// The server's database directory (kine's SQLite files).
pub const K3S_SERVER_DB: &str = "/var/lib/rancher/k3s/server/db";
/// The cluster's certificates and keys.
pub const K3S_SERVER_TLS: &str = "/var/lib/rancher/k3s/server/tls";
/// Credentials: node passwords, the passwd file.
pub const K3S_SERVER_CRED: &str = "/var/lib/rancher/k3s/server/cred";
/// Configuration k3s generates for its components (encryption config among it).
pub const K3S_SERVER_ETC: &str = "/var/lib/rancher/k3s/server/etc";
/// The local-path provisioner's volumes (PersistentVolumeClaims).
pub const K3S_STORAGE: &str = "/var/lib/rancher/k3s/storage";
/// kine's SQLite database: the cluster state when k3s runs without etcd.
pub const KINE_DB: &str = "/var/lib/rancher/k3s/server/db/state.db";
/// The node password k3s generates and checks the node against.
pub const NODE_PASSWD: &str = "/var/lib/rancher/k3s/server/cred/node-passwd";
/// k3s's runtime state (containerd's sockets and pid files among it).
pub const K3S_RUN_DIR: &str = "/run/k3s";
/// k3s writes its admin kubeconfig here, mode 0600 (`--write-kubeconfig-mode`): it holds the
/// cluster-admin key.
pub const KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
/// Written by the `pki` phase into [`K3S_MANIFESTS`]; named like the bundled manifests, which
/// the `manifests` phase owns, but never removed by it.
pub const TLS_SECRETS_MANIFEST: &str = "openshell-tls-secrets.yaml";

/// The containerd k3s embeds keeps its state here.
pub const CONTAINERD_ROOT: &str = "/var/lib/rancher/k3s/agent/containerd";
/// Under [`CONTAINERD_ROOT`]: the runtime's per-task state (shim state, pids, bundles).
pub const CONTAINERD_TASKS: &str = "io.containerd.runtime.v2.task";
/// Under [`CONTAINERD_ROOT`]: the sandbox controller's shim state.
pub const CONTAINERD_SHIMS: &str = "io.containerd.sandbox.controller.v1.shim";
/// Under [`CONTAINERD_ROOT`]: content being downloaded.
pub const CONTAINERD_INGEST: &str = "io.containerd.content.v1.content/ingest";
/// Under [`CONTAINERD_ROOT`]: the overlayfs snapshots (extracted image layers).
pub const CONTAINERD_OVERLAYFS: &str = "io.containerd.snapshotter.v1.overlayfs";

/// CNI configuration: with flannel off, containerd looks for it in the default directory.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Our bridge configuration in [`CNI_CONF_DIR`].
pub const CNI_CONFLIST: &str = "/etc/cni/net.d/10-bridge.conflist";
/// The ptp configuration older images put in [`CNI_CONF_DIR`].
pub const PTP_CONFLIST: &str = "/etc/cni/net.d/10-ptp.conflist";
/// Flannel's configuration, which k3s writes into its agent directory when flannel is on.
pub const FLANNEL_CONFLIST: &str = "/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist";
/// CNI plugins: containerd's default directory, where init links k3s's plugins.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The host-local IPAM plugin's address allocations.
pub const CNI_IPAM_DIR: &str = "/var/lib/cni/networks";
/// The CNI results cache.
pub const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// Pod network namespace files (nsfs bind mounts); `/var/run` is usually a link to `/run`.
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// The binaries k3s extracted for the build `hash`, its CNI plugins among them.
pub fn k3s_data_bin(hash: &str) -> String {
    format!("{K3S_DATA_DIR}/{hash}/bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path of k3s's own lies under its data directory or its run directory, and every
    /// path here is absolute, so joining one to a root cannot leave the root.
    #[test]
    fn paths_are_absolute_and_k3s_ones_under_its_directories() {
        for p in [
            K3S_DATA_DIR,
            K3S_AGENT,
            K3S_SERVER_DB,
            K3S_SERVER_TLS,
            K3S_SERVER_CRED,
            K3S_SERVER_ETC,
            K3S_STORAGE,
            K3S_MANIFESTS,
            K3S_CHARTS,
            KINE_DB,
            NODE_PASSWD,
            CONTAINERD_ROOT,
            FLANNEL_CONFLIST,
        ] {
            assert!(p.starts_with(&format!("{K3S_ROOT}/")), "{p}");
        }
        for p in [
            K3S_RUN_DIR,
            KUBECONFIG,
            CNI_CONF_DIR,
            CNI_CONFLIST,
            PTP_CONFLIST,
            CNI_BIN_DIR,
            CNI_IPAM_DIR,
            CNI_RESULTS_DIR,
            NETNS_DIRS[0],
            NETNS_DIRS[1],
        ] {
            assert!(p.starts_with('/'), "{p}");
        }
        assert!(CNI_CONFLIST.starts_with(&format!("{CNI_CONF_DIR}/")));
        // The state disk binds these directories: what lives in them goes with them.
        assert!(KINE_DB.starts_with(&format!("{K3S_SERVER_DB}/")));
        assert!(NODE_PASSWD.starts_with(&format!("{K3S_SERVER_CRED}/")));
        assert!(CONTAINERD_ROOT.starts_with(&format!("{K3S_AGENT}/")));
        assert!(FLANNEL_CONFLIST.starts_with(&format!("{K3S_AGENT}/")));
        assert_eq!(k3s_data_bin("h1"), "/var/lib/rancher/k3s/data/h1/bin");
    }
}
