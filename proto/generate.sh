#!/usr/bin/env bash
# Generate daemon/migration/migration_pb2.py and its type stub (.pyi) from
# proto/migration.proto with the protoc bundled in grpcio-tools (the one that
# matches the protobuf runtime; Debian's protobuf-compiler is too old).
#
#   proto/generate.sh           regenerate (commit the result with the .proto)
#   proto/generate.sh --check   exit 1 if the committed files are stale
#
# The generated files are committed, so a clean clone imports them with no
# build step; `make lint` runs --check so a .proto change without
# regeneration (or a hand edit of the output) fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=daemon/migration
FILES=(migration_pb2.py migration_pb2.pyi)

check=0
case "${1:-}" in
    "") ;;
    --check) check=1 ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# -I proto: the .proto's path inside the descriptor is "migration.proto".
"$PYTHON" -m grpc_tools.protoc -I proto --python_out="$tmp" --pyi_out="$tmp" proto/migration.proto

if [ "$check" -eq 1 ]; then
    stale=0
    for f in "${FILES[@]}"; do
        if ! cmp -s "$tmp/$f" "$OUT/$f"; then
            echo "proto: $OUT/$f is stale; run proto/generate.sh and commit the result" >&2
            stale=1
        fi
    done
    exit "$stale"
fi
for f in "${FILES[@]}"; do
    cp "$tmp/$f" "$OUT/$f"
done
echo "proto: wrote ${FILES[*]/#/$OUT/}"
