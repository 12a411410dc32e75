#!/bin/busybox sh
# /init of the vm-test initramfs. Prepares what a node has (the API
# filesystems, cgroup2, bpffs, the network modules, lo), runs the test
# binaries listed in /etc/svclb/tests.sh and powers off. The host reads the
# console: lines starting with "svclb-vm:" are for it, the rest is shown.
/bin/busybox --install -s /bin
# iproute2's ip (in /usr/sbin) must win over busybox's applet.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
# No tmpfs on /tmp: the initramfs root is writable already, and the test
# binaries and sources keep their host paths, which may lie under /tmp.
mkdir -p /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf

# Numbered so that dependencies load first.
for m in /modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m" || echo "svclb-vm: insmod $m failed"
done
ip link set lo up

echo "svclb-vm: kernel $(uname -r), $(nproc) cpus, $(free -m | awk '/Mem:/ {print $2}') MiB"

# Run one test binary in its package directory (as cargo test does), with
# libtest's JSON output so the host can attribute every result.
run() {
    dir=$1
    bin=$2
    shift 2
    echo "svclb-vm: run $bin"
    (cd "$dir" && "$bin" -Z unstable-options --format json --report-time --show-output "$@")
    echo "svclb-vm: exit $bin $?"
}

. /etc/svclb/env
. /etc/svclb/tests.sh

echo "svclb-vm: done"
sync
poweroff -f
