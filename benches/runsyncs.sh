#!/usr/bin/env bash
# runsyncs.sh - the syncs one `cstore run --rm IMAGE echo ok` makes (image pulled and
# unpacked: the density workload), counted with strace -f (fsync, fdatasync,
# sync_file_range, syncfs) and grouped by file, for each binary in BINS on one
# fresh store in a temp dir under /var/tmp (or STORE_DIR, e.g. a mount of the
# suite's HDD class). IMAGE is a fixtures tag (default busybox).
#
#   sudo BINS="base=/var/tmp/cstore-base/cstore new=target/release/cstore" benches/runsyncs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}
ROUNDS=${ROUNDS:-2}
tag=${IMAGE:-busybox}
if [ -z "${BINS:-}" ]; then
  cargo build --release --locked -q -p cstore
  BINS="new=$CARGO_TARGET_DIR/release/cstore"
fi
command -v strace >/dev/null || { echo "runsyncs.sh: needs strace" >&2; exit 1; }
if [ "$tag" = bench ]; then bench_image; else bash fixtures/images.sh >/dev/null; fi
work=$(mktemp -d "${STORE_DIR:-/var/tmp}/cstore-runsyncs.XXXXXX")
cleanup() {
  set +e
  bash fixtures/registry.sh stop "$work/reg"
  umount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bench_serve "$tag"
first=${BINS%% *}; first=${first#*=}
"$first" --root "$work/store" pull "$ref" >/dev/null
for r in $(seq "$ROUNDS"); do
  for lb in $BINS; do
    label=${lb%%=*} bin=${lb#*=}
    drop_caches
    strace -f -y -o "$work/trace" -e trace=fsync,fdatasync,sync_file_range,syncfs \
      "$bin" --root "$work/store" run --rm "$ref" echo ok >"$work/out"
    # one line per call (an interrupted call's "resumed" half is not counted)
    calls=$(grep -E '(fsync|fdatasync|sync_file_range|syncfs)\(' "$work/trace" || true)
    echo "$label round $r: $(grep -c . <<<"$calls") syncs:" \
      "$(sed -E 's/^[^(]*\([0-9]+<([^>]*)>.*/\1/; s#^'"$work"'/store/##; s#containers/[^/]*(/\.container\.json\.tmp-[0-9]+)?#containers/ID\1#; s#\.tmp-[0-9]+#.tmp#' <<<"$calls" |
        sort | uniq -c | awk '{printf "%s %s; ", $1, $2}')"
  done
done
