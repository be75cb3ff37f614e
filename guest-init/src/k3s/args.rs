//! The k3s command line, as a pure function of the configuration and the node IP, so that what
//! PID 1 executes is what the unit tests check.

use std::net::Ipv4Addr;

use openshell_shared::config::K3s;

/// The full argv, the binary first. The node name is the hostname, which k3s reads itself, so
/// there is no `--node-name`.
pub fn argv(cfg: &K3s, node_ip: Ipv4Addr) -> Vec<String> {
    let mut argv = vec![cfg.binary.clone(), "server".into()];
    if !cfg.disable.is_empty() {
        argv.push(format!("--disable={}", cfg.disable.join(",")));
    }
    // Pods get their network from the bridge CNI config that `k3s-prep` writes.
    argv.push("--disable-network-policy".into());
    // The admin kubeconfig holds the cluster-admin key: root only (init's probes and the exec
    // service run as root; the host gets it over the boot channel).
    argv.push("--write-kubeconfig-mode=600".into());
    argv.push(format!("--node-ip={node_ip}"));
    argv.push("--kube-apiserver-arg=bind-address=0.0.0.0".into());
    argv.push("--resolv-conf=/etc/resolv.conf".into());
    let ip = node_ip.to_string();
    let mut sans = cfg.tls_sans.clone();
    if !sans.contains(&ip) {
        sans.push(ip);
    }
    argv.push(format!("--tls-san={}", sans.join(",")));
    argv.push("--flannel-backend=none".into());
    argv.push(format!("--snapshotter={}", cfg.snapshotter));
    argv.push(format!(
        "--kube-proxy-arg=proxy-mode={}",
        cfg.kube_proxy_mode
    ));
    argv.push("--kube-proxy-arg=nodeport-addresses=0.0.0.0/0".into());
    let k = &cfg.kubelet;
    for arg in [
        format!("eviction-hard={}", k.eviction_hard),
        format!("eviction-minimum-reclaim={}", k.eviction_minimum_reclaim),
        format!("image-gc-high-threshold={}", k.image_gc_high_threshold),
        format!("image-gc-low-threshold={}", k.image_gc_low_threshold),
        format!("runtime-request-timeout={}", k.runtime_request_timeout),
    ] {
        argv.push(format!("--kubelet-arg={arg}"));
    }
    argv.extend(cfg.extra_args.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The final command line of the shell-based init, flag for flag, except the admin
    /// kubeconfig's mode (0644 there: readable by every guest user).
    const LEGACY: &[&str] = &[
        "/usr/local/bin/k3s",
        "server",
        "--disable=traefik,servicelb,metrics-server",
        "--disable-network-policy",
        "--write-kubeconfig-mode=600",
        "--node-ip=192.168.127.2",
        "--kube-apiserver-arg=bind-address=0.0.0.0",
        "--resolv-conf=/etc/resolv.conf",
        "--tls-san=localhost,127.0.0.1,10.0.2.15,192.168.127.2",
        "--flannel-backend=none",
        "--snapshotter=overlayfs",
        "--kube-proxy-arg=proxy-mode=nftables",
        "--kube-proxy-arg=nodeport-addresses=0.0.0.0/0",
        "--kubelet-arg=eviction-hard=imagefs.available<0%,nodefs.available<0%",
        "--kubelet-arg=eviction-minimum-reclaim=imagefs.available=1%,nodefs.available=1%",
        "--kubelet-arg=image-gc-high-threshold=100",
        "--kubelet-arg=image-gc-low-threshold=99",
        "--kubelet-arg=runtime-request-timeout=10m",
    ];

    #[test]
    fn defaults_give_the_legacy_command_line() {
        assert_eq!(
            argv(&K3s::default(), Ipv4Addr::new(192, 168, 127, 2)),
            LEGACY
        );
    }

    #[test]
    fn node_ip_is_added_to_the_sans_once() {
        let a = argv(&K3s::default(), Ipv4Addr::new(192, 168, 127, 9));
        assert!(a.contains(&"--node-ip=192.168.127.9".to_string()));
        assert!(a.contains(
            &"--tls-san=localhost,127.0.0.1,10.0.2.15,192.168.127.2,192.168.127.9".to_string()
        ));
        let a = argv(&K3s::default(), Ipv4Addr::new(10, 0, 2, 15));
        assert!(a.contains(&"--tls-san=localhost,127.0.0.1,10.0.2.15,192.168.127.2".to_string()));
    }

    #[test]
    fn configuration_reaches_the_flags() {
        let mut cfg = K3s {
            binary: "/opt/k3s".into(),
            disable: Vec::new(),
            snapshotter: "native".into(),
            kube_proxy_mode: "iptables".into(),
            extra_args: vec!["--debug".into()],
            ..K3s::default()
        };
        cfg.kubelet.image_gc_low_threshold = 80;
        let a = argv(&cfg, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(a[..2], ["/opt/k3s", "server"]);
        assert!(!a.iter().any(|x| x.starts_with("--disable=")));
        assert!(a.contains(&"--snapshotter=native".to_string()));
        assert!(a.contains(&"--kube-proxy-arg=proxy-mode=iptables".to_string()));
        assert!(a.contains(&"--kubelet-arg=image-gc-low-threshold=80".to_string()));
        assert_eq!(a.last().map(String::as_str), Some("--debug"));
    }
}
