# The old way, for `cargo xtask bench boot`: what the shell init did for the steps openshell-init's
# phases do, with busybox. The mount table, hostname, kernel check, stale-state removal and the
# no-device network run in private namespaces on a scratch tree, so the booted system is untouched;
# DHCP runs last on the real eth0 (udhcpc with the old flags and lease script), when there is one.
unshare -m -u -n /bin/sh -c '
r=/tmp/shell-way
mkdir -p $r/proc $r/sys $r/dev $r/run $r/tmp
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t tmpfs tmpfs $r/tmp
mount -t tmpfs tmpfs $r/run
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm $r/sys/fs/cgroup
mount -t devpts devpts $r/dev/pts
mount -t tmpfs tmpfs $r/dev/shm
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup
hostname openshell-vm
ip link set lo up
# Kernel check: a bridge must be creatable; netfilter must be there.
ip link add _cap_br0 type bridge && ip link del _cap_br0
[ -d /proc/sys/net/netfilter ] || [ -f /proc/sys/net/bridge/bridge-nf-call-iptables ]
# Stale runtime and pod-network state.
c=$r/var/lib/rancher/k3s/agent/containerd
rm -rf $c/io.containerd.runtime.v2.task $c/io.containerd.sandbox.controller.v1.shim
rm -rf $c/io.containerd.content.v1.content/ingest && mkdir -p $c/io.containerd.content.v1.content/ingest
find $r/var/lib/rancher/k3s $r/run -name "*.sock" -delete 2>/dev/null
rm -rf $r/run/k3s $r/var/lib/rancher/k3s/server/cred/node-passwd
rm -rf $r/var/lib/cni/networks $r/var/lib/cni/results
# No network device: a dummy with an address and a default route.
ip link add dummy0 type dummy
ip addr add 10.0.2.15/24 dev dummy0
ip link set dummy0 up
ip route add default dev dummy0
'
if [ -e /sys/class/net/eth0 ]; then
  udhcpc -i eth0 -f -q -n -T 1 -t 3 -A 1 -s /opt/bench/udhcpc.script >/dev/null 2>&1
fi
