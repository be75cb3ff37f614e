# Sourced by the VM tests' guest scripts: a pod as k3s's CNI makes one. Its own network
# namespace (`unshare -n`, root in it, so with CAP_NET_ADMIN there), a veth into the guest's,
# the guest's end as its gateway, forwarding on, and its traffic masqueraded on the way out (the
# hidden `openshell-init nft-test --masquerade`). Sets $pod (a process in it) and $in_pod (the
# prefix that runs a command there); appends what it did to $log.
make_pod() {
    unshare -n sleep 600 &
    pod=$!
    while [ "$(readlink /proc/$pod/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
    ip link add vpod type veth
    ip link set veth0 netns $pod
    ip addr add 10.42.0.1/24 dev vpod
    ip link set vpod up
    in_pod="nsenter -t $pod -n"
    $in_pod ip link set veth0 name eth0
    $in_pod ip addr add 10.42.0.5/24 dev eth0
    $in_pod ip link set eth0 up
    $in_pod ip route add default via 10.42.0.1
    sysctl -qw net.ipv4.ip_forward=1
    /sbin/openshell-init nft-test --masquerade eth0 >> $log 2>&1
}
