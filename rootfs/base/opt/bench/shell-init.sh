#!/bin/sh
# The old way, for `cargo xtask bench boot`: PID 1 as a busybox shell script doing what the old
# init script did for the steps openshell-init's phases do (mounts, hostname, network, cleanup
# and checks), booted on the same root filesystem, kernel and VM. Its start and end go to the kernel log through /dev/kmsg,
# so they carry the kernel's own timestamps; then it resets the VM (the host sees the VMM exit).
echo "<3>shell-init: entry" > /dev/kmsg
# 1.2 Mounts, in the old init's two parallel batches.
mount -t proc proc /proc 2>/dev/null &
mount -t sysfs sysfs /sys 2>/dev/null &
mount -t tmpfs tmpfs /tmp 2>/dev/null &
mount -t tmpfs tmpfs /run 2>/dev/null &
mount -t devtmpfs devtmpfs /dev 2>/dev/null &
wait
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts 2>/dev/null &
mount -t tmpfs tmpfs /dev/shm 2>/dev/null &
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null &
wait
# 1.3 Hostname and loopback.
hostname openshell-vm || true
ip link set lo up || true
# 1.5 k3s directories.
mkdir -p /var/lib/rancher/k3s /etc/rancher/k3s
# 1.6 Stale runtime artifacts.
rm -f /var/lib/rancher/k3s/server/cred/node-passwd
find /var/lib/rancher/k3s /run -name '*.sock' -delete 2>/dev/null || true
c=/var/lib/rancher/k3s/agent/containerd
if [ -d "$c" ]; then
  rm -rf "$c/io.containerd.runtime.v2.task" "$c/io.containerd.sandbox.controller.v1.shim"
  rm -rf "$c/io.containerd.content.v1.content/ingest"
  mkdir -p "$c/io.containerd.content.v1.content/ingest"
fi
rm -rf /run/k3s
# 1.7 Stale CNI and pod-network state.
if ip link show cni0 >/dev/null 2>&1; then
  ip link set cni0 down; ip link delete cni0
fi
for v in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link delete "$v" 2>/dev/null || true
done
rm -rf /var/lib/cni/networks /var/lib/cni/results
ip route flush 10.42.0.0/24 2>/dev/null || true
if [ -d /var/run/netns ]; then
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  rm -rf /run/netns/* /var/run/netns/*
fi
# 1.8 Kernel capability check.
if ip link add _cap_br0 type bridge 2>/dev/null; then
  ip link delete _cap_br0 2>/dev/null
else
  echo "FATAL: CONFIG_BRIDGE missing"; exit 1
fi
if [ ! -d /proc/sys/net/netfilter ] && [ ! -f /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  echo "FATAL: netfilter missing"; exit 1
fi
# 1.4 Network.
if ip link show eth0 >/dev/null 2>&1; then
  ip link set eth0 up
  if ! udhcpc -i eth0 -f -q -n -T 1 -t 3 -A 1 -s /opt/bench/udhcpc.script >/dev/null 2>&1; then
    ip addr add 192.168.127.2/24 dev eth0 2>/dev/null
    ip route add default via 192.168.127.1 2>/dev/null
  fi
  [ -s /etc/resolv.conf ] || printf 'nameserver 8.8.8.8\nnameserver 8.8.4.4\n' > /etc/resolv.conf
  NODE_IP=$(ip -4 addr show eth0 | awk '/inet /{split($2, a, "/"); print a[1]; exit}')
else
  ip link add dummy0 type dummy
  ip addr add 10.0.2.15/24 dev dummy0
  ip link set dummy0 up
  ip route add default dev dummy0
  NODE_IP=10.0.2.15
fi
echo "<3>shell-init: workload node-ip=${NODE_IP:-192.168.127.2}" > /dev/kmsg
sync
reboot -f
