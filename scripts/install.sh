#!/usr/bin/env bash
# make install / make uninstall / make deb: ferry on a Debian 12 host.
#
# Usage: scripts/install.sh install|uninstall|deb, with PREFIX (default
# /usr/local) and DESTDIR (a staging directory; empty: this machine) in the
# environment, as the Makefile passes them. deb stages with PREFIX=/usr and
# packs that tree (dpkg-deb) into build/ferry_VERSION_ARCH.deb, whose
# maintainer scripts do on the host what install and uninstall do without
# DESTDIR (/etc's files are its conffiles). What goes where:
#
#   $PREFIX/lib/ferry/venv/               the Python code: a private virtualenv
#                                         of Debian's /usr/bin/python3 holding
#                                         this project's wheel and its
#                                         dependencies from PyPI
#   $PREFIX/bin/PROGRAM                   symlinks to the venv's console scripts
#   $UNITDIR/ferry-repair.socket ...      systemd/'s units, /usr/local/ replaced
#                                         by $PREFIX/ (UNITDIR: $PREFIX/lib/
#                                         systemd/system for /usr and /usr/local,
#                                         which systemd searches; else /etc/...)
#   $PREFIX/share/doc/ferry/README.md     what the units' Documentation= names
#   /etc/libvirt/hooks/qemu.d/ferry       -> $PREFIX/bin/ferry-libvirt-hook
#   $PREFIX/lib/ferry/passt-compat/passt  -> $PREFIX/bin/ferry-passt (first on
#                                         libvirt's PATH: the README says how)
#   /etc/ferry/guest.conf.example         etc/ of this tree; kept if present
#   /etc/default/ferry-repair             (an operator's edits survive)
#
# With DESTDIR empty, also: the system group "ferry" (ferryd's units' Group=),
# libvirt's QEMU user libvirt-qemu made a supplementary member of it (QEMU
# reaches ferryd's vhost-user socket through it: systemd/ferryd@.service says
# why), and, where systemd runs, daemon-reload and ferry-repair.socket
# enabled and started. uninstall removes every file install put in place,
# and /etc's two files only if unchanged; it leaves the group and the
# membership, as Debian's packages leave the system users and groups they
# created (files may still belong to them). With DESTDIR set, uninstall
# also removes the directories it leaves empty there.
#
# The venv is built where it is staged ($DESTDIR$PREFIX/lib/ferry/venv) and
# then made to name its final place: the console scripts' #! lines and
# pyvenv.cfg, and the bytecode, compiled with the final paths (compileall
# -s/-p) since no unprivileged ferryd may write __pycache__ later.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

action=${1:?usage: $0 install|uninstall|deb}
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
PYTHON=${PYTHON:-/usr/bin/python3}
DEST=""
if [ -n "${DESTDIR:-}" ]; then
    DEST=$(realpath -m "$DESTDIR")
fi
case "$PREFIX" in
    /usr | /usr/local) UNITDIR=$PREFIX/lib/systemd/system ;;
    *) UNITDIR=/etc/systemd/system ;;
esac
VENV=$PREFIX/lib/ferry/venv
DOCDIR=$PREFIX/share/doc/ferry
COMPAT=$PREFIX/lib/ferry/passt-compat
HOOK=/etc/libvirt/hooks/qemu.d/ferry
# Console scripts linked into $PREFIX/bin when the venv has them (the last
# two come with the libvirt integration).
PROGRAMS=(ferryd ferryctl ferry-repair ferry-tap-setup ferry-libvirt-hook ferry-passt)
# This tree's etc/ files, installed under /etc.
CONFIG=(ferry/guest.conf.example default/ferry-repair)

say() { echo "ferry-install: $*"; }
systemd_runs() { [ -z "$DEST" ] && [ -d /run/systemd/system ]; }

quietly() {
    # A command's output only when it fails.
    local out
    if ! out=$("$@" 2>&1); then
        echo "$out" >&2
        say "failed: $*" >&2
        return 1
    fi
}

install_venv() {
    rm -rf "$DEST$VENV"
    mkdir -p "$(dirname "$DEST$VENV")"
    quietly "$PYTHON" -m venv "$DEST$VENV"
    # Non-editable: pip builds this tree's wheel, then installs it and its
    # dependencies (pyproject.toml's [project] dependencies) from PyPI.
    # setuptools builds in build/lib and build/bdist.*, and would pack a
    # module deleted since the last build from there: none is left behind.
    rm -rf build/lib build/bdist.*
    quietly "$DEST$VENV/bin/pip" install --no-compile --no-warn-script-location "$REPO"
    rm -rf build/lib build/bdist.*
    # What only installing needed goes (ferry imports neither), and with it
    # the bytecode written with the staging paths while pip ran.
    quietly "$DEST$VENV/bin/python" -m pip uninstall -y pip setuptools
    find "$DEST$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
    if [ -n "$DEST" ]; then
        local file
        { grep -rlF "$DEST$VENV" "$DEST$VENV/bin" "$DEST$VENV/pyvenv.cfg" || true; } | while read -r file; do
            sed -i "s|$DEST$VENV|$VENV|g" "$file"
        done
        quietly "$PYTHON" -m compileall -q -s "$DEST" -p / "$DEST$VENV/lib"
    else
        quietly "$PYTHON" -m compileall -q "$VENV/lib"
    fi
}

install_files() {
    install -d -m 0755 "$DEST$PREFIX/bin" "$DEST$UNITDIR" "$DEST$DOCDIR"
    local program unit file
    for program in "${PROGRAMS[@]}"; do
        if [ -x "$DEST$VENV/bin/$program" ]; then
            ln -sfn "../lib/ferry/venv/bin/$program" "$DEST$PREFIX/bin/$program"
        fi
    done
    for unit in systemd/*; do
        sed "s|/usr/local/|$PREFIX/|g" "$unit" >"$DEST$UNITDIR/$(basename "$unit")"
        chmod 0644 "$DEST$UNITDIR/$(basename "$unit")"
    done
    install -m 0644 README.md "$DEST$DOCDIR/README.md"
    if [ -x "$DEST$VENV/bin/ferry-libvirt-hook" ]; then
        install -d -m 0755 "$DEST$(dirname "$HOOK")"
        ln -sfn "$PREFIX/bin/ferry-libvirt-hook" "$DEST$HOOK"
    fi
    if [ -x "$DEST$VENV/bin/ferry-passt" ]; then
        install -d -m 0755 "$DEST$COMPAT"
        ln -sfn "$PREFIX/bin/ferry-passt" "$DEST$COMPAT/passt"
    fi
    for file in "${CONFIG[@]}"; do
        install -d -m 0755 "$DEST/etc/$(dirname "$file")"
        if [ -e "$DEST/etc/$file" ]; then
            say "/etc/$file exists: kept as it is"
        else
            install -m 0644 "etc/$file" "$DEST/etc/$file"
        fi
    done
}

setup_host() {
    if ! getent group ferry >/dev/null; then
        groupadd --system ferry
        say "created the system group ferry"
    fi
    if id libvirt-qemu >/dev/null 2>&1 && ! id -nG libvirt-qemu | tr ' ' '\n' | grep -qx ferry; then
        usermod -a -G ferry libvirt-qemu
        say "libvirt-qemu is now a member of group ferry (restart libvirtd for its QEMUs)"
    fi
    if systemd_runs; then
        systemctl daemon-reload
        systemctl enable --now ferry-repair.socket
    fi
    say "installed under $PREFIX; libvirtd reads /etc/libvirt/hooks at start: restart it"
}

stop_services() {
    if systemd_runs; then
        systemctl disable --now ferry-repair.socket || true
        systemctl stop ferry-repair.service 'ferryd@*.service' 'ferryd-netns@*.service' || true
    fi
}

uninstall() {
    stop_services
    rm -rf "$DEST$VENV"
    local program unit file
    for program in "${PROGRAMS[@]}"; do
        if [ "$(readlink "$DEST$PREFIX/bin/$program" 2>/dev/null)" = "../lib/ferry/venv/bin/$program" ]; then
            rm -f "$DEST$PREFIX/bin/$program"
        fi
    done
    for unit in systemd/*; do
        rm -f "$DEST$UNITDIR/$(basename "$unit")"
    done
    rm -f "$DEST$DOCDIR/README.md"
    if [ "$(readlink "$DEST$HOOK" 2>/dev/null)" = "$PREFIX/bin/ferry-libvirt-hook" ]; then
        rm -f "$DEST$HOOK"
    fi
    rm -f "$DEST$COMPAT/passt"
    for file in "${CONFIG[@]}"; do
        if [ -e "$DEST/etc/$file" ] && ! cmp -s "etc/$file" "$DEST/etc/$file"; then
            say "/etc/$file was changed: kept"
        else
            rm -f "$DEST/etc/$file"
        fi
    done
    rmdir --ignore-fail-on-non-empty "$DEST$COMPAT" "$DEST$PREFIX/lib/ferry" "$DEST$DOCDIR" \
        "$DEST/etc/ferry" 2>/dev/null || true
    if [ -n "$DEST" ]; then
        [ -d "$DEST" ] && find "$DEST" -mindepth 1 -depth -type d -empty -delete
    elif systemd_runs; then
        systemctl daemon-reload
    fi
    if [ -z "$DEST" ] && getent group ferry >/dev/null; then
        say "the system group ferry stays (Debian's convention): groupdel ferry to remove it"
    fi
}

# The maintainer scripts run what make install and uninstall run on the host
# (these functions, copied in by declare -f); dpkg removes the files itself.
maintainer_script() {
    printf '#!/bin/bash\n# ferry %s, written by scripts/install.sh deb.\nset -e\n' "$1"
    printf 'DEST=""\nPREFIX=/usr\n'
    declare -f say systemd_runs setup_host stop_services
    printf '%s\n' "$2"
}

deb() {
    local version arch root package
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
    arch=$(dpkg --print-architecture)
    root=$REPO/build/deb/ferry
    package=$REPO/build/ferry_${version}_${arch}.deb
    rm -rf "$root" "$REPO"/build/ferry_*.deb
    PREFIX=/usr DESTDIR=$root "$0" install
    install -d -m 0755 "$root/DEBIAN"
    cat >"$root/DEBIAN/control" <<CONTROL
Package: ferry
Version: $version
Architecture: $arch
Maintainer: ferry developers <ferry@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: python3 (>= 3.11~), python3 (<< 3.12), libcap2, libseccomp2, systemd
Recommends: libvirt-daemon-system
Section: net
Priority: optional
Description: user-mode networking for VMs whose TCP connections survive live migration
 ferryd serves a VM (vhost-user) or a network namespace (tap) with host
 sockets; ferry-repair moves its TCP connections on live migration.
 Units ferryd@.service (per libvirt domain), ferryd-netns@.service and
 ferry-repair.socket; libvirt hook /etc/libvirt/hooks/qemu.d/ferry.
CONTROL
    (cd "$root" && find etc -type f | sed 's|^|/|') >"$root/DEBIAN/conffiles"
    maintainer_script postinst 'if [ "$1" = configure ]; then setup_host; fi' >"$root/DEBIAN/postinst"
    maintainer_script prerm 'if [ "$1" = remove ]; then stop_services; fi' >"$root/DEBIAN/prerm"
    maintainer_script postrm \
        'if [ "$1" = remove ] && systemd_runs; then systemctl daemon-reload; fi' >"$root/DEBIAN/postrm"
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
    quietly dpkg-deb --root-owner-group --build "$root" "$package"
    say "built $package"
}

case "$action" in
    install)
        install_venv
        install_files
        if [ -z "$DEST" ]; then
            setup_host
        fi
        ;;
    uninstall) uninstall ;;
    deb) deb ;;
    *)
        echo "usage: $0 install|uninstall|deb" >&2
        exit 2
        ;;
esac
