#!/bin/sh
# The guest's side of tests/vm/containerd.rs, run as the workload on the containerd-test root:
# Debian's containerd and runc with containerd's root on the storage each step names, the
# overlayfs snapshotter, the test's busybox image (/containerd-image.tar, named in
# /containerd-image.name) imported and run with a cgroup v2 memory limit.
#
# Usage: containerd-probe.sh STEP...
#   virtiofs    containerd's root on the virtio-fs root (/var/lib/containerd-virtiofs)
#   tmpfs       containerd's root on a tmpfs
#   disk-write  k3s's containerd root (the state disk): import, run, write to a volume there,
#               then keep a container writing until the host kills the VM
#   disk-check  the next boot: the image is still there, the volume's data is intact
#
# Every result is a `STEP.name: value` line in /probe.out (the test reads it from the root); the
# raw output goes to /probe.log and containerd's log to /probe-containerd-STEP.log.
out=/probe.out
log=/probe.log
touch $out $log
say() { echo "$step.$1: $2" >> $out; }
note() { echo "--- $step: $*" >> $log; }

LIMIT=67108864
image=$(cat /containerd-image.name)
# k3s's containerd root (guest-init/src/k3s/paths.rs CONTAINERD_ROOT), on the state disk.
K3S_AGENT=/var/lib/rancher/k3s/agent
DISK_ROOT=$K3S_AGENT/containerd
VOLUME=$K3S_AGENT/probe-volume

# Starts containerd with root $1 and state $2 (its socket there) and waits until it answers.
start_containerd() {
    root=$1
    state=$2
    sock=$state/containerd.sock
    mkdir -p "$root" "$state"
    # No CRI (k3s's job; it would look for CNI) and no snapshotters this kernel cannot have.
    cat > /tmp/containerd-$step.toml <<EOF
version = 2
root = "$root"
state = "$state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$sock"
EOF
    containerd --config /tmp/containerd-$step.toml > /probe-containerd-$step.log 2>&1 &
    cpid=$!
    i=0
    until ctr -a "$sock" version > /dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 600 ] || ! kill -0 $cpid 2> /dev/null; then
            say containerd "not answering"
            return 1
        fi
        sleep 0.2
    done
    say containerd up
    say fstype "$(stat -f -c %T "$root")"
}

stop_containerd() {
    kill $cpid
    wait $cpid
}

c() { ctr -a "$sock" "$@"; }

# `ctr run` of the image as container $1 with the memory limit, cgroup /probe-$step/$1, then
# the rest of the arguments; records its status as $1-status and its output in the log.
run_limited() {
    name=$1
    shift
    note "ctr run $name $*"
    c run --rm --memory-limit $LIMIT --cgroup /probe-$step/$name "$@" > /tmp/run.out 2>&1
    status=$?
    cat /tmp/run.out >> $log
    say $name-status $status
}

# The last line of ctr's output that says what failed (the whole line: the test records it).
failure_of() { grep -E 'ctr: |level=error' "$1" | tail -n 1; }

import_image() {
    note "ctr images import"
    c images import /containerd-image.tar > /tmp/import.out 2>&1
    say import-status $?
    cat /tmp/import.out >> $log
    say import-failure "$(failure_of /tmp/import.out)"
    say images "$(c images ls -q | tr '\n' ' ' | sed 's/ $//')"
}

# An allocation under the limit that succeeds, read from the container's cgroup while it waits
# (the limit and the peak charged), and one over it that the kernel's OOM killer ends; the OOM
# kills counted in the cgroup above the containers. A directory bound into the first container
# is the rendezvous: it says `ran`, the probe reads its cgroup and says `go`.
memory_limit() {
    rv=/tmp/rendezvous-$step
    mkdir -p $rv
    cg=/sys/fs/cgroup/probe-$step/under
    run_limited under --mount type=bind,src=$rv,dst=/rv,options=rbind:rw "$image" under sh -c \
        'dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null && echo allocated; touch /rv/ran; until [ -e /rv/go ]; do sleep 0.1; done' &
    runner=$!
    i=0
    until [ -e $rv/ran ] || ! kill -0 $runner 2> /dev/null || [ $i -gt 1200 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    say memory-max "$(cat $cg/memory.max 2>&1)"
    say memory-peak "$(cat $cg/memory.peak 2>&1)"
    touch $rv/go
    wait $runner
    say under-failure "$(failure_of /tmp/run.out)"
    say under-allocated "$(grep -c '^allocated$' /tmp/run.out)"
    run_limited over "$image" over dd if=/dev/zero of=/dev/null bs=100M count=1
    say oom-kill "$(awk '$1 == "oom_kill" { print $2 }' /sys/fs/cgroup/probe-$step/memory.events 2> /dev/null)"
}

for step in "$@"; do
    case $step in
    virtiofs)
        start_containerd /var/lib/containerd-virtiofs /run/containerd-virtiofs || continue
        import_image
        memory_limit
        # The kernel says why it refused the overlay.
        say kernel "$(dmesg | grep -i overlayfs | sort -u | tr '\n' ';')"
        stop_containerd
        ;;
    tmpfs)
        mkdir -p /mnt/tmpfs
        mount -t tmpfs -o size=256m tmpfs /mnt/tmpfs
        start_containerd /mnt/tmpfs/containerd /run/containerd-tmpfs || continue
        import_image
        memory_limit
        stop_containerd
        ;;
    disk-write)
        say agent-fstype "$(stat -f -c %T $K3S_AGENT)"
        start_containerd $DISK_ROOT /run/containerd-disk || continue
        import_image
        memory_limit
        mkdir -p $VOLUME
        # A payload written and synced before the kill, with its digest kept on the virtio-fs
        # root for the next boot to compare.
        dd if=/dev/urandom of=$VOLUME/payload bs=1M count=4 2>> $log
        sync
        sha256sum $VOLUME/payload | cut -d' ' -f1 > /probe-payload.sha256
        say payload "$(cat /probe-payload.sha256)"
        # A container appending numbered records to the volume and syncing each; after each
        # sync it appends the record's number to /probe-acks/synced on the virtio-fs root, which
        # the host reads after the kill: every record acknowledged there must survive.
        mkdir -p /probe-acks
        note "ctr run -d writer"
        c run -d --null-io --memory-limit $LIMIT --cgroup /probe-$step/writer \
            --mount type=bind,src=$VOLUME,dst=/data,options=rbind:rw \
            --mount type=bind,src=/probe-acks,dst=/acks,options=rbind:rw \
            "$image" writer sh -c \
            'i=0; while :; do i=$((i+1)); echo "record $i" >> /data/records; sync; echo $i >> /acks/synced; done' \
            >> $log 2>&1
        say writer-status $?
        # The host kills the VM once records are being acknowledged.
        until [ -s /probe-acks/synced ]; do sleep 0.1; done
        say writing yes
        sleep 600
        ;;
    disk-check)
        say agent-fstype "$(stat -f -c %T $K3S_AGENT)"
        start_containerd $DISK_ROOT /run/containerd-disk || continue
        say images "$(c images ls -q | tr '\n' ' ' | sed 's/ $//')"
        say payload "$(sha256sum $VOLUME/payload | cut -d' ' -f1)"
        cp $VOLUME/records /probe-records
        say records-copied $?
        # The image runs again from the snapshots kept on the disk.
        run_limited again "$image" again echo from-the-disk
        say again-output "$(grep -c '^from-the-disk$' /tmp/run.out)"
        say ext4 "$(dmesg | grep -E 'EXT4-fs \(vd' | tr '\n' ';')"
        stop_containerd
        ;;
    esac
    say done yes
done
