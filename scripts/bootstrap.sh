#!/usr/bin/env bash
# Install what ferry needs on a Debian 12 machine, as root; safe to run again.
# Debian packages: the build needs libcap-dev and gcc (python-prctl builds from
# source); the tests need real clients and peers (udhcpc, dhclient, socat,
# iperf3, curl) and the references the benchmarks measure against (pasta,
# slirp4netns); libc6-dev's static libc for the VM guest's own program
# (testbed/guest_conns.c, gcc -static) and make for the passt the VM benchmark
# builds. Python packages go into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    iproute2 procps kmod libcap-dev gcc libc6-dev make python3-dev python3-venv
    busybox udhcpc isc-dhcp-client socat iperf3 curl
    passt slirp4netns systemd
    tshark
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: missing Debian packages (${missing[*]}); run as root" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# QEMU >= 10 for the virtual-machine tests (tests/integration/vm, testbed/vm.py)
# and libvirt 11.3 for the libvirt hook's real-libvirt test
# (tests/integration/vm/test_vm_libvirt.py, testbed/libvirt.py). Debian 12
# has QEMU 7.2 and libvirt 9.0 in main, QEMU 10.0 and libvirt 11.3 in
# bookworm-backports: the backports suite is added as a deb822 source of its
# own, and only these packages and what they need come from there (backports
# is never preferred on its own). Without them the VM tests (or the libvirt
# ones) skip and say why.
BACKPORTS_PACKAGES=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
qemu_version() {
    dpkg-query -W -f='${db:Status-Abbrev}${Version}' qemu-system-x86 2>/dev/null \
        | sed -n 's/^ii *//p'
}
qemu_is_recent() {
    local version
    version=$(qemu_version)
    [ -n "$version" ] && dpkg --compare-versions "$version" ge 1:10
}
libvirt_is_installed() {
    local pkg
    for pkg in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || return 1
    done
}
if [ "$(id -u)" -eq 0 ] && { ! qemu_is_recent || ! libvirt_is_installed; }; then
    if [ "$(. /etc/os-release && echo "$VERSION_CODENAME")" = bookworm ]; then
        backports=/etc/apt/sources.list.d/bookworm-backports.sources
        if ! grep -qs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*; then
            printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
                'Suites: bookworm-backports' 'Components: main' \
                'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$backports"
        fi
        echo "bootstrap: installing ${BACKPORTS_PACKAGES[*]} from bookworm-backports"
        # apt's output (debconf's notes included) is shown only when it fails.
        if ! out=$(apt-get update -qq 2>&1 && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends -t bookworm-backports \
            "${BACKPORTS_PACKAGES[@]}" 2>&1); then
            echo "$out" >&2
            echo "bootstrap: installing ${BACKPORTS_PACKAGES[*]} from bookworm-backports failed" >&2
        fi
    fi
    if ! qemu_is_recent; then
        echo "bootstrap: warning: qemu-system-x86 is '$(qemu_version)', not >= 10;" \
            "the VM tests will skip" >&2
    fi
    if ! libvirt_is_installed; then
        echo "bootstrap: warning: libvirt is not installed; the libvirt VM tests will skip" >&2
    fi
fi

# Debian's own interpreter, not one found first on PATH: ferryd drops to an
# unprivileged user (nobody by default) after setup, and then still imports
# modules lazily (the stdlib, the migration code); an interpreter under a
# private home (a pyenv build in /root, mode 0700) is unreadable to it.
# A venv built from another interpreter is rebuilt.
PYTHON=${PYTHON:-/usr/bin/python3}
if [ -x .venv/bin/python ] \
    && ! grep -qx "home = $(dirname "$(readlink -f "$(command -v "$PYTHON")")")" .venv/pyvenv.cfg 2>/dev/null; then
    echo "bootstrap: .venv was built from another interpreter; rebuilding it from $PYTHON"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's metadata changed since the last install.
if [ ! -f .venv/.stamp-install ] || [ pyproject.toml -nt .venv/.stamp-install ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    # setuptools warns about every editable install that maps names
    # (ferryd -> daemon/); the output is shown only when the install fails.
    if ! out=$(.venv/bin/pip install -q -e '.[test]' 2>&1); then
        echo "$out" >&2
        exit 1
    fi
    touch .venv/.stamp-install
fi

# The folders daemon/ and repair_helper/ install as ferryd and ferry_repair
# (pyproject.toml); mypy reads those names through these links.
mkdir -p build/import-names
ln -sfn ../../daemon build/import-names/ferryd
ln -sfn ../../repair_helper build/import-names/ferry_repair

# ferryd started as root runs as nobody once set up and keeps importing
# lazily from the venv and the tree: both must be readable by that user.
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null \
    && ! setpriv --reuid 65534 --regid 65534 --clear-groups \
        .venv/bin/python -c 'import ferryd.main, ferryd.migration.source' 2>/dev/null; then
    echo "bootstrap: warning: uid 65534 cannot import ferry from $(pwd)/.venv;" \
        "ferryd will fail after dropping to nobody (make the tree readable, mode 0755)" >&2
fi

# Unprivileged ICMP echo sockets (ferryd's ping flows) need the daemon's group
# inside net.ipv4.ping_group_range; the kernel default "1 0" allows nobody.
if [ "$(id -u)" -eq 0 ]; then
    range=$(cat /proc/sys/net/ipv4/ping_group_range)
    if [ "$range" != "0	2147483647" ]; then
        sysctl -q -w net.ipv4.ping_group_range="0 2147483647"
    fi
fi

# passt-repair from Debian 13, for the repair client's interoperability test.
# Optional: without it that one test skips and says why.
if [ "$(id -u)" -eq 0 ] && [ ! -x .venv/cache/passt-repair/passt-repair ]; then
    ./scripts/fetch-passt-repair.sh || echo "bootstrap: passt-repair not fetched (interop test will skip)" >&2
fi
