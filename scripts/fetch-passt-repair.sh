#!/usr/bin/env bash
# Fetch passt-repair (passt's TCP_REPAIR helper) from Debian 13's passt package
# into .venv/cache/passt-repair/, for the interoperability test of ferryd's
# repair client (tests/integration/test_repair_passt_interop.py).
#
# Debian 12 has no passt-repair; trixie's binary needs only glibc 2.34, so it
# runs here. The package is downloaded with a private apt configuration (own
# source list, lists and cache in a temporary directory): the system's apt
# setup is not touched. The archive is the one the system's sources already
# use. Safe to run again; does nothing when the binary is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.venv/cache/passt-repair
if [ -x "$dest/passt-repair" ]; then
    exit 0
fi

# The Debian archive of the system's main suite, from deb822 or one-line sources.
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
archive=$(
    {
        awk -v suite="$codename" '
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = uri }
            /^$/ { uri = "" }
            END { if (found) print found }
        ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
        awk -v suite="$codename" '$1 == "deb" { for (i = 2; i <= NF; i++)
            if ($i ~ /^[a-z]+:\/\//) { if ($(i + 1) == suite) print $i; break } }' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
    } | head -n 1
)
if [ -z "$archive" ]; then
    echo "fetch-passt-repair: no Debian archive for $codename in the apt sources" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive trixie main" \
    >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    -o APT::Sandbox::User=root -q
)
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$work/deb" && apt-get "${apt_opts[@]}" download passt >/dev/null)
dpkg-deb -x "$work"/deb/passt_*.deb "$work/root"
mkdir -p "$dest"
install -m 0755 "$work/root/usr/bin/passt-repair" "$dest/passt-repair"
dpkg-deb -f "$work"/deb/passt_*.deb Version >"$dest/VERSION"
echo "fetch-passt-repair: passt-repair $(cat "$dest/VERSION") in $dest"
