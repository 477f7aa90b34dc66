#!/bin/busybox sh
# PID 1 of a kernel-matrix guest (`cargo xtask test-vm`, xtask/src/vm/). It mounts what the tests need, loads
# the modules listed in /vm/modules, asks the agent which hooks this kernel gets (an agent in mode auto, read back
# with `mesh-agent status`), runs each test binary listed in /vm/tests with CI=true, and powers off.
# The console (ttyS0) carries everything for people; ttyS1 carries only "@@vm ..." lines, which the host parses.
/bin/busybox mkdir -p /bb
/bin/busybox --install -s /bb
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb HOME=/root TMPDIR=/tmp LANG=C.UTF-8
. /vm/env

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /tmp
# No tmpfs on /tmp: the root is already a writable tmpfs, and the workspace (with the binaries at their build
# paths) may itself live under /tmp, as a CI checkout can.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf

stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3>/dev/ttyS1
report() { echo "@@vm $*" >&3; }

report kernel "$(uname -r)"
report boot "$(cut -d' ' -f1 /proc/uptime)"
echo "vm: kernel $(uname -r), $(nproc) CPUs, booted in $(cut -d' ' -f1 /proc/uptime) s"
hostname vm
ip link set lo up

while read -r name file; do
    if insmod "$file"; then report module "$name" loaded; else report module "$name" failed; fi
done < /vm/modules

# The agent's own choice on this kernel: mode auto, a child cgroup, one service; read back with its own CLI
# (`mesh-agent status -o json`: readiness and the data path's per-feature status), on one line.
probe() {
    mkdir -p /tmp/probe /sys/fs/cgroup/vm-probe
    cp /vm/probe.yaml /tmp/probe/config.yaml
    cp /vm/probe-catalog.yaml /tmp/probe/catalog.yaml
    RUST_LOG=info "$AGENT" run --config /tmp/probe/config.yaml > /tmp/probe/agent.log 2>&1 &
    pid=$!
    status=
    i=0
    while [ "$i" -lt "$PROBE_TIMEOUT" ]; do
        if "$AGENT" status -o json --admin 127.0.0.1:9099 > /tmp/probe/status.json 2>/dev/null &&
            grep -q '"ready": true' /tmp/probe/status.json; then
            status=$(tr -d '\n' < /tmp/probe/status.json)
            report probe "$status"
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
        i=$((i + 1))
    done
    [ -n "$status" ] || report probe-failed "the agent (mode auto) was not ready within ${PROBE_TIMEOUT}s"
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
    echo "vm: agent log (mode auto):"
    cat /tmp/probe/agent.log
    rmdir /sys/fs/cgroup/vm-probe 2>/dev/null
}
probe

# Each test binary in its package's directory, as cargo runs it.
while read -r label exe args; do
    report test "$label" begin
    echo "vm: running $label: $exe $args"
    start=$(date +%s)
    (
        cd "$WORKDIR" && CI=true RUST_BACKTRACE=1 timeout -s KILL "$TEST_TIMEOUT" "$exe" $args
        echo $? > /tmp/rc
    ) 2>&1 | tee "/tmp/$label.out"
    rc=$(cat /tmp/rc)
    grep '^test result:' "/tmp/$label.out" | while read -r line; do report result "$label" "$line"; done
    # The last "failures:" section of libtest lists the failed tests' names.
    awk '/^failures:$/ { n = 0 } /^    [^ ]+$/ { names[n++] = $1 } END { for (i = 0; i < n; i++) print names[i] }' \
        "/tmp/$label.out" | while read -r name; do report failed "$label" "$name"; done
    report test "$label" end "$rc" $(($(date +%s) - start))
done < /vm/tests

report done
poweroff -f
