#!/usr/bin/env bash
# run.sh - latency of running a container, in one run, on the same image (the
# busybox test image, 3 layers, served by a registry on 127.0.0.1 and pulled
# and unpacked by each tool beforehand: this measures run, not pull):
#   cstore     cstore --root R run --rm IMG CMD
#   ctr        ctr -n bench run --rm IMG ID CMD: a private containerd 1.6
#              (own root, state and socket) with runc, overlayfs snapshotter
#   ctr+cs     the same containerd with cstore's snapshotter as a proxy plugin
#              (`cstore snapshotter serve`, a root of its own)
# for CMD = `true` (time to exit) and `echo x` (time to the first byte the
# container writes, i.e. its first instruction, and to exit), measured from the
# spawn of the command by benches/runlat.py. RUNS rounds, each running every
# case once in turn; prints median and p90 (ms) and the ratio cstore / peer.
# CSTORE_BASE=PATH adds another cstore binary (e.g. a build of main) as column
# "base", with a root of its own: before and after a change in one run.
#
#   sudo benches/run.sh        (RUNS=20 rounds after 2 untimed ones)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}

bench_setup busybox
plugin_pid=
cleanup() {
  stop_containerd "$work/ctrd" || true
  [ -z "$plugin_pid" ] || { kill "$plugin_pid" 2>/dev/null; wait "$plugin_pid" 2>/dev/null || true; }
  bench_cleanup
}
trap cleanup EXIT

cs=("$cstore" --root "$work/cstore")
"${cs[@]}" pull "$ref" >/dev/null
base=${CSTORE_BASE:+$CSTORE_BASE --root $work/base}
[ -z "$base" ] || $base pull "$ref" >/dev/null

"$cstore" --root "$work/plugin" snapshotter serve --address "$work/plugin.sock" 2>"$work/plugin.log" &
plugin_pid=$!
for _ in $(seq 200); do [ -S "$work/plugin.sock" ] && break; sleep 0.05; done
[ -S "$work/plugin.sock" ] || { echo "snapshotter did not listen: $(cat "$work/plugin.log")" >&2; exit 1; }
start_containerd "$work/ctrd" "[proxy_plugins]
  [proxy_plugins.cstore]
    type = \"snapshot\"
    address = \"$work/plugin.sock\""
ctr=(ctr -a "$work/ctrd/containerd.sock" -n bench)
"${ctr[@]}" image pull --plain-http "$ref" >/dev/null
"${ctr[@]}" image pull --plain-http --snapshotter cstore "$ref" >/dev/null

echo "image $ref; roots on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work")); $(nproc) CPUs; $RUNS rounds"
cases=() n=0
for c in "true" "echo x"; do
  n=$((n + 1))
  cases+=("run --rm $c/cstore=${cs[*]} run --rm $ref $c"
          "run --rm $c/ctr=${ctr[*]} run --rm $ref ov$n-{i} $c"
          "run --rm $c/ctr+cs=${ctr[*]} run --rm --snapshotter cstore $ref cs$n-{i} $c")
  [ -z "$base" ] || cases+=("run --rm $c/base=$base run --rm $ref $c")
done
python3 benches/runlat.py --rounds "$RUNS" "${cases[@]}"
