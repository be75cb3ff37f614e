# The old way, for `cargo xtask bench boot`: what the shell init did for the same steps (mount
# table, hostname, loopback), with busybox, in private namespaces so the booted system is untouched.
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
'
