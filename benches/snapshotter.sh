#!/usr/bin/env bash
# snapshotter.sh - latency of Prepare + Commit + Remove on top of chains of 1, 2,
# 4, 8, 16, 32 and 64 committed layers, through containerd's proxy snapshotter
# client over a unix socket, in one run: `cstore snapshotter serve` vs containerd
# 1.6's built-in overlayfs snapshotter served the same way (the conformance
# peer's `reference` binary, built by shared/conformance/.../build-reference.sh).
# Prints the median µs of each call for both and the ratio cstore/overlayfs.
#
#   sudo benches/snapshotter.sh        (ITER=200 rounds per depth; DEPTHS=1,2,...,64)
#
# The client is benches/snaplat/main.go (containerd's snapshots/proxy client),
# built in GOPATH mode against Debian's containerd sources, offline. Both
# snapshotters keep their roots in one temp dir under /var/tmp (same filesystem).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
ITER=${ITER:-200}
DEPTHS=${DEPTHS:-1,2,4,8,16,32,64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}
shared=${CSTORE_SHARED:-$(cd .. && pwd)/shared}
cache=${CSTORE_BENCH_GO:-/var/tmp/cstore-bench-go}

bash fixtures/deps.sh --bench
ref=$(bash "$shared/conformance/containerd-snapshotter/build-reference.sh")
cargo build --release --locked -q -p cstore
cstore=$CARGO_TARGET_DIR/release/cstore

mkdir -p "$cache/src/snaplat"
if ! cmp -s benches/snaplat/main.go "$cache/src/snaplat/main.go" || [ ! -x "$cache/snaplat" ]; then
  cp benches/snaplat/main.go "$cache/src/snaplat/main.go"
  (cd "$cache/src/snaplat" && GOPATH="$cache:/usr/share/gocode" GO111MODULE=off GOFLAGS= go build -o "$cache/snaplat" .)
fi

work=$(mktemp -d /var/tmp/cstore-bench-snap.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$cstore" --root "$work/cstore" snapshotter serve --address "$work/cstore.sock" 2>"$work/cstore.log" &
pids+=($!)
"$ref" --root "$work/overlayfs" --address "$work/overlayfs.sock" 2>"$work/overlayfs.log" &
pids+=($!)
for s in cstore overlayfs; do
  for _ in $(seq 200); do [ -S "$work/$s.sock" ] && break; sleep 0.05; done
  [ -S "$work/$s.sock" ] || { echo "$s did not listen: $(cat "$work/$s.log")" >&2; exit 1; }
done

echo "roots on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work")); $(nproc) CPUs"
"$cache/snaplat" --iterations "$ITER" --depths "$DEPTHS" \
  cstore="$work/cstore.sock" overlayfs="$work/overlayfs.sock"
