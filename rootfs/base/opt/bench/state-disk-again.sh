#!/bin/sh
# For `cargo xtask bench boot`, as the workload of a warm state-disk boot: undoes what the
# boot's state-disk phase mounted (its binds, then the disk) and runs the phase again, alone and
# in place, printing its events as JSON lines. The second run repeats every step on the same
# disk (find, read, mount, seed marker, binds) with the kernel's code for them already executed
# once, which under software emulation means already translated: the phase's own cost.
set -eu
mp=/run/openshell/state-disk
dev=$(awk -v mp="$mp" '$2 == mp { print $1 }' /proc/self/mounts)
[ -n "$dev" ] || { echo "state-disk-again: nothing mounted on $mp" >&2; exit 1; }
# Newest first: the binds, then the disk itself.
for target in $(awk -v dev="$dev" '$1 == dev { print $2 }' /proc/self/mounts | sed -n '1!G;h;$p'); do
  umount "$target"
done
exec /sbin/openshell-init phase state-disk --root / --in-place --cmdline "$(cat /proc/cmdline)"
