"""The test guest: a Debian kernel and a busybox initramfs, built from Debian packages.

The VM tests need a guest that boots in seconds under TCG, takes its
addresses from the back-end by DHCP, and lets the test run commands in it.
A disk image would be large and slow to build; a distribution's cloud image
would boot for a minute under TCG. This guest is two files:

* the ``vmlinuz`` of Debian's current ``linux-image-amd64`` (its dependency
  ``linux-image-<abi>-amd64``), unpacked with ``dpkg-deb -x``;
* an initramfs (a gzip'd cpio "newc" archive, written here) holding the
  static busybox of Debian's ``busybox-static``, the kernel modules that
  virtio-net needs with their dependencies (Debian builds virtio, virtio_pci
  and virtio_net as modules; whatever ``modules.builtin`` lists is skipped),
  and three shell scripts: :data:`INIT`, :data:`DHCP_HOOK` and
  :data:`CHANNEL`;
* for the benchmarks (bench/qemu_migration.py): Debian's ``iperf3`` with
  its shared libraries and the loader (found by their ELF ``NEEDED``
  entries in the unpacked packages of :data:`IPERF3_PACKAGES`), and
  ``/bin/guest_conns``, our own testbed/guest_conns.c compiled statically
  here with the host's ``gcc -static`` (many checked connections in one
  process: a thousand busybox ``nc`` are too slow under TCG).

The guest's ``/init`` mounts proc, sys, devtmpfs and a tmpfs, loads the
modules in dependency order, brings eth0 up, keeps busybox ``udhcpc``
running on it (the lease is applied by :data:`DHCP_HOOK` and written to
``/run/dhcp``; IPv6 comes from the kernel's own SLAAC when the back-end
sends router advertisements), and then serves the command channel on its
second serial port, ``/dev/ttyS1`` (testbed/vm.py connects QEMU's end of it
to a Unix socket). The protocol is line based, one request at a time:

* the guest says ``@@ferry-ready`` once, when the channel is up;
* a request is one line, ``<tag> <shell command>``;
* the answer is a line ``@@ferry <tag> <exit status> <length>`` followed by
  exactly ``<length>`` bytes: the command's stdout and stderr.

The first serial port, ``/dev/ttyS0``, is the kernel's console.

Packages come from Debian's archive through a private apt configuration
(its own source list, package lists and cache under the cache directory):
the system's apt setup is not touched and its package lists may be stale.
Downloaded packages are kept; the image itself lives in a directory named
after a hash of this file and of guest_conns.c, the recipe, so that
changing any script, list or that program rebuilds it and nothing else does.
Builds are serialised by a lock file, so that concurrent test runs build it
once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.apt_cache import KEYRING, locked, private_apt
from testbed.paths import REPO

__all__ = [
    "CACHE",
    "CHANNEL",
    "DHCP_HOOK",
    "INIT",
    "GuestImage",
    "GuestImageError",
    "build_guest_image",
]

#: Where the guest is built (not committed; ``make clean`` removes it with the venv).
CACHE = REPO / ".venv" / "cache" / "vm"

#: Debian's archive, the suites the guest's packages come from, and the packages.
ARCHIVE = "http://deb.debian.org/debian"
SECURITY_ARCHIVE = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: What eth0 needs, as module names; their dependencies are found with modinfo.
MODULES = ("virtio_pci", "virtio_net")
#: iperf3 and the packages holding the libraries it needs (the guest gets the
#: binary, the libraries its ELF ``NEEDED`` entries name, and the loader).
IPERF3_PACKAGES = ("iperf3", "libiperf0", "libssl3", "libsctp1", "libc6")
#: The guest's checked-connections program (our own; compiled with gcc -static).
GUEST_CONNS_SOURCE = Path(__file__).resolve().parent / "guest_conns.c"
#: Where an x86-64 Debian package puts shared libraries, and the loader's path.
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
LOADER = "lib64/ld-linux-x86-64.so.2"

#: The guest's /init (PID 1: it must never exit, or the kernel panics).
INIT = r"""#!/bin/busybox sh
# ferry's test guest (testbed/guest_image.py): mount, load virtio-net, DHCP,
# then serve the command channel on /dev/ttyS1 for ever.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for module in $(cat /etc/modules); do
    insmod "/lib/modules/$module.ko" || echo "ferry-guest: insmod $module failed"
done
ip link set lo up
# Addresses usable at once (no duplicate address detection), as in the bed's
# namespaces: SLAAC's address is there as soon as the router advertisement is.
sysctl -q -w net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
# virtio_net registers eth0 when the PCI device is probed, during insmod;
# wait a little all the same rather than fail on a slow probe.
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ "$tries" -lt 100 ]; do
    usleep 100000
    tries=$((tries + 1))
done
ip link set eth0 up || echo "ferry-guest: no eth0"
# Foreground mode, in the background: udhcpc stays to renew the lease.
udhcpc -f -i eth0 -s /etc/dhcp-hook -O mtu >/dev/console 2>&1 &
echo "ferry-guest: up, command channel on ttyS1"
while :; do
    sh /etc/channel </dev/ttyS1 >/dev/ttyS1 2>&1
done
"""

#: udhcpc's hook: apply the lease (busybox exports ip, mask in bits, router, mtu...).
DHCP_HOOK = r"""#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr replace "$ip/$mask" dev "$interface"
    if [ -n "$mtu" ]; then
        ip link set dev "$interface" mtu "$mtu"
    fi
    for gateway in $router; do
        ip route replace default via "$gateway" dev "$interface"
        break
    done
    echo "event=$1 ip=$ip mask=$mask router=$router mtu=$mtu" \
        "lease=$lease serverid=$serverid dns=$dns" >/run/dhcp
    ;;
esac
"""

#: The command channel's loop, on /dev/ttyS1 (protocol: module docstring). The
#: tty is raw: no echo, no line editing, bytes through as they are.
CHANNEL = r"""stty raw -echo
echo "@@ferry-ready"
while IFS= read -r line; do
    tag=${line%% *}
    command=${line#* }
    sh -c "$command" </dev/null >/tmp/.channel-out 2>&1
    status=$?
    printf '@@ferry %s %d %d\n' "$tag" "$status" "$(wc -c </tmp/.channel-out)"
    cat /tmp/.channel-out
done
"""

#: The kernel's command line: console on ttyS0; a panic ends QEMU (with -no-reboot).
KERNEL_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"


class GuestImageError(Exception):
    """The guest could not be built: a download, an unpacked package or a module is missing."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the kernel, the initramfs and the command line to boot them with."""

    kernel: Path
    initrd: Path
    cmdline: str
    #: What went in: package versions, the kernel release, the modules in load order.
    manifest: dict[str, object]


def recipe_key() -> str:
    """A hash of this file and guest_conns.c: what the image is made of."""
    recipe = Path(__file__).read_bytes() + GUEST_CONNS_SOURCE.read_bytes()
    return hashlib.sha256(recipe).hexdigest()[:16]


def build_guest_image(cache: Path = CACHE) -> GuestImage:
    """Return the guest for the current recipe, building it first if the cache lacks it."""
    cache.mkdir(parents=True, exist_ok=True)
    image_dir = cache / f"image-{recipe_key()}"
    with locked(cache / ".lock"):
        if not (image_dir / "manifest.json").exists():
            _build(cache, image_dir)
            for stale in cache.glob("image-*"):
                if stale != image_dir:
                    shutil.rmtree(stale, ignore_errors=True)
    manifest = json.loads((image_dir / "manifest.json").read_text())
    return GuestImage(
        kernel=image_dir / "vmlinuz",
        initrd=image_dir / "initrd.gz",
        cmdline=KERNEL_CMDLINE,
        manifest=manifest,
    )


def _build(cache: Path, image_dir: Path) -> None:
    debs = _download(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        work = Path(tmp)
        kernel_root = work / "kernel"
        busybox_root = work / "busybox"
        _run(["dpkg-deb", "-x", str(debs["kernel"]), str(kernel_root)])
        _run(["dpkg-deb", "-x", str(debs["busybox"]), str(busybox_root)])
        vmlinuz, modules_dir = _kernel_files(kernel_root)
        modules = _module_closure(modules_dir, MODULES)
        busybox = busybox_root / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestImageError(f"{debs['busybox'].name} holds no bin/busybox")
        entries: list[_Entry] = [
            _Entry.directory(d) for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc")
        ]
        entries += _bench_tools(debs, work)
        entries += [
            # The kernel opens /dev/console for /init before devtmpfs is mounted.
            _Entry.char_device("dev/console", 5, 1),
            _Entry.file("bin/busybox", busybox.read_bytes(), 0o755),
            _Entry.file("init", INIT.encode(), 0o755),
            _Entry.file("etc/dhcp-hook", DHCP_HOOK.encode(), 0o755),
            _Entry.file("etc/channel", CHANNEL.encode(), 0o644),
            _Entry.file("etc/modules", "".join(f"{m.name}\n" for m in modules).encode(), 0o644),
        ]
        entries += [_Entry.file(f"lib/modules/{m.name}.ko", m.read(), 0o644) for m in modules]
        built = work / "image"
        built.mkdir()
        shutil.copyfile(vmlinuz, built / "vmlinuz")
        (built / "initrd.gz").write_bytes(gzip.compress(_cpio(entries), mtime=0))
        manifest = {
            "recipe": recipe_key(),
            "kernel_package": debs["kernel"].name,
            "busybox_package": debs["busybox"].name,
            "kernel_release": modules_dir.name,
            "modules": [m.name for m in modules],
            "iperf3_packages": [debs[p].name for p in IPERF3_PACKAGES],
        }
        (built / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(image_dir, ignore_errors=True)
        built.rename(image_dir)


# ---------------------------------------------------------------------------
# Packages, through a private apt configuration


def _download(cache: Path) -> dict[str, Path]:
    """Fetch the kernel and busybox packages into cache/debs; return their paths."""
    debs_dir = cache / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    sources = (
        f"deb [signed-by={KEYRING}] {ARCHIVE} {SUITE} main\n"
        f"deb [signed-by={KEYRING}] {SECURITY_ARCHIVE} {SUITE}-security main\n"
    )
    opts = [*private_apt(cache / "apt", sources), "-o", "APT::Architecture=amd64"]
    _run(["apt-get", *opts, "update"])
    depends = _run(["apt-cache", *opts, "depends", "--no-recommends", KERNEL_METAPACKAGE])
    kernels = re.findall(r"^\s*Depends: (linux-image-\S+-amd64)$", depends, re.MULTILINE)
    if not kernels:
        raise GuestImageError(f"{KERNEL_METAPACKAGE} depends on no kernel package:\n{depends}")
    kernel_package = kernels[0]
    wanted = (kernel_package, BUSYBOX_PACKAGE, *IPERF3_PACKAGES)
    _run(["apt-get", *opts, "download", *wanted], cwd=debs_dir)
    found: dict[str, Path] = {}
    roles = [("kernel", kernel_package), ("busybox", BUSYBOX_PACKAGE)]
    for role, package in [*roles, *((p, p) for p in IPERF3_PACKAGES)]:
        candidates = sorted(debs_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise GuestImageError(f"apt-get download {package} left no .deb in {debs_dir}")
        found[role] = candidates[-1]
        for older in candidates[:-1]:
            older.unlink()
    return found


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestImageError(f"{argv[0]} failed: {e}") from e
    if result.returncode != 0:
        raise GuestImageError(
            f"{' '.join(argv)} failed with exit status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result.stdout


# ---------------------------------------------------------------------------
# The benchmarks' tools: iperf3 with its libraries, guest_conns


def _bench_tools(debs: dict[str, Path], work: Path) -> list[_Entry]:
    """iperf3, the libraries it needs, the loader, and a static guest_conns, as entries."""
    root = work / "iperf3"
    for package in IPERF3_PACKAGES:
        _run(["dpkg-deb", "-x", str(debs[package]), str(root)])
    iperf3 = root / "usr" / "bin" / "iperf3"
    if not iperf3.is_file():
        raise GuestImageError(f"{debs['iperf3'].name} holds no usr/bin/iperf3")
    libraries: dict[str, Path] = {}
    pending = [iperf3]
    while pending:
        for name in _elf_needed(pending.pop()):
            if name in libraries:
                continue
            found = [root / d / name for d in LIB_DIRS if (root / d / name).exists()]
            if not found:
                raise GuestImageError(
                    f"iperf3 needs {name}, which none of {', '.join(IPERF3_PACKAGES)} holds"
                )
            libraries[name] = _resolve_in(root, found[0])
            pending.append(libraries[name])
    loader = _resolve_in(root, root / LOADER)
    conns = work / "guest_conns"
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(conns), str(GUEST_CONNS_SOURCE)])
    return [
        _Entry.directory("lib/x86_64-linux-gnu"),
        _Entry.directory("lib64"),
        _Entry.file("bin/iperf3", iperf3.read_bytes(), 0o755),
        _Entry.file(LOADER, loader.read_bytes(), 0o755),
        *(
            _Entry.file(f"lib/x86_64-linux-gnu/{name}", path.read_bytes(), 0o644)
            for name, path in sorted(libraries.items())
        ),
        _Entry.file("bin/guest_conns", conns.read_bytes(), 0o755),
    ]


def _elf_needed(path: Path) -> list[str]:
    """The shared libraries an ELF file names in its dynamic section (``readelf -d``)."""
    dynamic = _run(["readelf", "-d", str(path)])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)


def _resolve_in(root: Path, path: Path) -> Path:
    """*path* with its symlinks followed inside *root* (an absolute target means root's)."""
    for _ in range(16):
        if not path.is_symlink():
            return path
        target = Path(path.readlink())
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise GuestImageError(f"symlink loop at {path}")


# ---------------------------------------------------------------------------
# The kernel package: vmlinuz, and modules with their dependencies


def _kernel_files(root: Path) -> tuple[Path, Path]:
    """The vmlinuz and the lib/modules/<release> directory of an unpacked kernel package."""
    kernels = sorted(root.glob("boot/vmlinuz-*"))
    releases = sorted(root.glob("lib/modules/*")) + sorted(root.glob("usr/lib/modules/*"))
    if len(kernels) != 1 or len(releases) != 1:
        raise GuestImageError(
            f"expected one boot/vmlinuz-* and one lib/modules/* in the kernel package, "
            f"found {[str(p) for p in kernels + releases]}"
        )
    return kernels[0], releases[0]


def _module_name(path_or_name: str) -> str:
    """A module's canonical name: kernel/net/core/fail-over.ko.xz -> fail_over."""
    base = path_or_name.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


@dataclass(frozen=True)
class _Module:
    name: str
    path: Path

    def read(self) -> bytes:
        """The module, uncompressed (busybox insmod passes it to init_module as is)."""
        data = self.path.read_bytes()
        if self.path.name.endswith(".ko"):
            return data
        if self.path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        raise GuestImageError(f"{self.path.name}: compression not supported by the guest builder")


def _module_closure(modules_dir: Path, wanted: Iterable[str]) -> list[_Module]:
    """*wanted* and their dependencies, not built in, in load order (dependencies first)."""
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(line.strip()) for line in builtin_file.read_text().splitlines()}
        if builtin_file.exists()
        else set()
    )
    files = {_module_name(p.name): p for p in modules_dir.rglob("*.ko*")}
    order: list[_Module] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = files.get(name)
        if path is None:
            raise GuestImageError(
                f"module {name} (needed by {' -> '.join(chain) or 'the guest'}) is neither "
                f"built into {modules_dir.name} nor in its package"
            )
        depends = _run(["modinfo", "-F", "depends", str(path)]).strip()
        for dep in filter(None, depends.split(",")):
            visit(_module_name(dep), (*chain, name))
        seen.add(name)
        order.append(_Module(name, path))

    for name in wanted:
        visit(_module_name(name), ())
    return order


# ---------------------------------------------------------------------------
# The initramfs: a cpio archive in the "newc" format the kernel unpacks
# (Documentation/driver-api/early-userspace/buffer-format.rst)


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str) -> _Entry:
        return cls(name, 0o040755)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int) -> _Entry:
        return cls(name, 0o100000 | perm, data)

    @classmethod
    def char_device(cls, name: str, major: int, minor: int) -> _Entry:
        return cls(name, 0o020600, rdev=(major, minor))


def _cpio(entries: Iterable[_Entry]) -> bytes:
    out = bytearray()

    def add(ino: int, entry: _Entry) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0, 2 if entry.mode & 0o040000 else 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(entry.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        add(ino, entry)
    add(0, _Entry("TRAILER!!!", 0))
    return bytes(out)


def main() -> None:
    """``python -m testbed.guest_image``: build (or find) the guest and print its manifest."""
    image = build_guest_image()
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd), **image.manifest}))


if __name__ == "__main__":
    main()
