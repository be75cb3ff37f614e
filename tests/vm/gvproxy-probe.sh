#!/bin/sh
# The guest's side of tests/vm/gvproxy.rs, run as the workload with real gvproxy as the network:
# what the guest and a pod namespace routed through it see of gvproxy's network. Every check
# appends `name: result` to /probe.out (the test reads it from the root afterwards); the raw
# answers go to /probe.log for failure messages.
out=/probe.out
log=/probe.log
: > $out
: > $log
say() { echo "$1: $2" >> $out; }

# The first line of what gvproxy's API at 192.168.127.1:80 answers, run in namespace $1 (empty:
# the guest's own), or nc's complaint when the connection fails.
api() {
    printf 'GET /services/forwarder/all HTTP/1.0\r\nHost: 192.168.127.1\r\n\r\n' \
        | $1 nc -w 5 192.168.127.1 80 > /tmp/api.out 2>&1
    echo "--- api ${1:-guest}" >> $log
    cat /tmp/api.out >> $log
    head -n 1 /tmp/api.out | tr -d '\r'
}

# Whether a TCP connection to gvproxy's DNS port opens from namespace $1: gvproxy answers there.
gateway_tcp() {
    if $1 nc -w 5 192.168.127.1 53 < /dev/null >> $log 2>&1; then echo open; else echo closed; fi
}

# The address `nslookup` gives for $1 (the answer's, not the server's), through resolv.conf.
lookup() {
    nslookup "$1" > /tmp/ns.out 2>&1
    echo "--- nslookup $1" >> $log
    cat /tmp/ns.out >> $log
    awk '/^Name:/ { named = 1 } named && /^Address/ { print $2; exit }' /tmp/ns.out
}

say resolv "$(grep '^nameserver' /etc/resolv.conf | tr '\n' ' ')"
say dns-host "$(lookup host.containers.internal)"
say dns-gateway "$(lookup gateway.containers.internal)"

. /pod-netns.sh
make_pod
say masquerade $?

say guest-gateway-tcp "$(gateway_tcp)"
say pod-gateway-tcp "$(gateway_tcp "$in_pod")"
say guest-api "$(api)"
say pod-api "$(api "$in_pod")"

# The same requests without the refusal: gvproxy's API answers them.
/sbin/openshell-init nft-test --remove-refusal >> $log 2>&1
say removed $?
say guest-api-unrefused "$(api)"
say pod-api-unrefused "$(api "$in_pod")"
grep -o '"local":"[^"]*","remote":"[^"]*"' /tmp/api.out | tr '\n' ' ' > /tmp/fw.out
say api-forwards "$(cat /tmp/fw.out)"

kill $pod
say done yes
