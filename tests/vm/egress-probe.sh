#!/bin/sh
# The guest's side of tests/vm/egress.rs, run as the workload: what the guest and a pod reach of
# the user's host loopback, and of the exec service from inside the guest.
#   egress-probe.sh ADDR LISTED UNLISTED EXEC_HEX
# ADDR is where the network puts the host's 127.0.0.1 (gvproxy: 192.168.127.254), or `router`
# for the default router (passt's gateway). The host listens on 127.0.0.1:LISTED (given with
# --host-port) and :UNLISTED, each answering with a line. EXEC_HEX is an exec request (touching
# /pwned) sent to the exec service's vsock port from inside the guest. Every check appends
# `name: result` to /probe.out; raw output goes to /probe.log.
out=/probe.out
log=/probe.log
: > $out
: > $log
say() { echo "$1: $2" >> $out; }
addr=$1 listed=$2 unlisted=$3 exec_hex=$4
if [ "$addr" = router ]; then
    addr=$(ip route | awk '/^default/ { print $3; exit }')
fi
say addr "$addr"

# The first line the host sends on ADDR:$2, from namespace $1 (empty: the guest's), or nc's
# complaint. nc's input stays open (a fifo a sleep holds) until the host closes: Debian's passt
# (0.0~git20230309) mostly loses the host's FIN when the guest has closed its side first, as nc
# does at once with </dev/null, and nc would then wait for it forever.
reach() {
    rm -f /tmp/hold
    mkfifo /tmp/hold
    sleep 10 > /tmp/hold &
    hold=$!
    $1 nc -w 5 "$addr" "$2" < /tmp/hold > /tmp/reach.out 2>&1
    # Reaped before the next fifo open, which its SIGCHLD would interrupt.
    kill $hold 2>/dev/null
    wait $hold 2>/dev/null
    echo "--- ${1:-guest} $addr:$2" >> $log
    cat /tmp/reach.out >> $log
    head -n 1 /tmp/reach.out
}

. /pod-netns.sh
make_pod
say masquerade $?

for ns in guest pod; do
    prefix=""
    [ $ns = pod ] && prefix="$in_pod"
    say $ns-listed "$(reach "$prefix" $listed)"
    say $ns-unlisted "$(reach "$prefix" $unlisted)"
done

# The pod, root with CAP_NET_ADMIN in its own namespace, flushes then deletes the `openshell`
# table: there is none there, and the guest's stays.
$in_pod /sbin/openshell-init nft-test --flush-refusal > /tmp/rm.out 2>&1
say pod-flush "$? $(head -n 1 /tmp/rm.out)"
$in_pod /sbin/openshell-init nft-test --remove-refusal > /tmp/rm.out 2>&1
say pod-remove "$? $(head -n 1 /tmp/rm.out)"
say pod-unlisted-after "$(reach "$in_pod" $unlisted)"

# The exec service from inside the guest: the loopback CID and the guest's own.
for cid in 1 3; do
    timeout 10 /sbin/openshell-init vsock-send --cid $cid --port 10777 --hex "$exec_hex" \
        > /tmp/vsock.out 2>&1
    status=$?
    echo "--- vsock $cid: $status" >> $log
    cat /tmp/vsock.out >> $log
    say vsock-$cid "$status $(tr -d '\000-\010' < /tmp/vsock.out | tr '\n' ' ')"
done
say pwned "$([ -e /pwned ] && echo yes || echo no)"

# Without the guest's rules (the same flush, in the guest's namespace): what the network itself
# lets through.
/sbin/openshell-init nft-test --flush-refusal >> $log 2>&1
say removed $?
say pod-unlisted-unrefused "$(reach "$in_pod" $unlisted)"

kill $pod
say done yes
