#!/usr/bin/env bash
# unpack.sh - pull + unpack of a multi-layer image (≥ 500 MB unpacked, tens of
# thousands of files) from a registry on 127.0.0.1, in one run, cold page cache
# before each measurement:
#   (a) cstore pull (fetch + unpack into layer snapshots), fresh root
#   (b) skopeo copy docker://… oci:… , then umoci unpack of that layout
#       (timed separately, summed)
#   (c) ctr image pull --plain-http: a private containerd 1.6, overlayfs
#       snapshotter, fresh root each run
#   (d) unpack alone: cstore unpack on a store with the blobs but no snapshots,
#       vs umoci unpack of an OCI layout with the same blobs
# Prints the median of RUNS runs of each, the ratios, and cstore's peak RSS
# (from /usr/bin/time -v). CSTORE_BASE=PATH runs another cstore binary (e.g. a
# build of main) through (a) and (d) as well, in the same runs: before and after.
#
#   sudo benches/unpack.sh            (RUNS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}

bench_setup

# t NAME CMD...: run CMD under /usr/bin/time -v; NAME gets "wall-seconds peak-RSS-KiB".
t() {
  local out=$work/$1; shift
  /usr/bin/time -v -o "$out.v" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" "$out.v" >&2; return 1; }
  awk -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
    /Maximum resident set size/ { rss = $2 }
    END { print s, rss }' "$out.v" > "$out"
}

# A store with the blobs but no snapshots, for (d): pulled once, copied per run.
"$cstore" --root "$work/pulled" pull --no-unpack "$ref" >/dev/null

for i in $(seq "$RUNS"); do
  # (a)
  rm -rf "$work/cs"; drop_caches
  t "cstore-pull.$i" "$cstore" --root "$work/cs" pull "$ref"
  files=$(find "$work/cs/snapshots" -xdev | wc -l)
  unpacked=$(du -sm "$work/cs/snapshots" | cut -f1)
  rm -rf "$work/cs"
  if [ -n "${CSTORE_BASE:-}" ]; then
    drop_caches
    t "base-pull.$i" "$CSTORE_BASE" --root "$work/cs" pull "$ref"
    rm -rf "$work/cs"
  fi

  # (b)
  rm -rf "$work/sk" "$work/bundle"; drop_caches
  t "skopeo.$i" skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/sk:bench"
  drop_caches
  t "umoci.$i" umoci unpack --image "$work/sk:bench" "$work/bundle"
  rm -rf "$work/bundle"

  # (c)
  stop_containerd "$work/ctrd"; rm -rf "$work/ctrd"
  start_containerd "$work/ctrd"
  drop_caches
  t "ctr.$i" ctr -a "$work/ctrd/containerd.sock" -n bench image pull --plain-http "$ref"
  stop_containerd "$work/ctrd"; rm -rf "$work/ctrd"

  # (d) the layout from (b) stays for umoci; cstore gets a copy of its store
  rm -rf "$work/cu"; cp -a "$work/pulled" "$work/cu"; drop_caches
  t "cstore-unpack.$i" "$cstore" --root "$work/cu" unpack "$ref"
  if [ -n "${CSTORE_BASE:-}" ]; then
    rm -rf "$work/cu"; cp -a "$work/pulled" "$work/cu"; drop_caches
    t "base-unpack.$i" "$CSTORE_BASE" --root "$work/cu" unpack "$ref"
  fi
  rm -rf "$work/cu" "$work/bundle"; drop_caches
  t "umoci-alone.$i" umoci unpack --image "$work/sk:bench" "$work/bundle"
  # cstore makes each layer durable (syncfs) before committing it; umoci
  # doesn't: what writing umoci's tree back costs, for comparison.
  t "umoci-sync.$i" sync
  rm -rf "$work/bundle" "$work/sk"
done

col() { for i in $(seq "$RUNS"); do awk -v c="$2" '{print $c}' "$work/$1.$i"; done | median; }
sum() { for i in $(seq "$RUNS"); do paste -d' ' "$work/$1.$i" "$work/$2.$i" | awk '{print $1 + $3}'; done | median; }
cs=$(col cstore-pull 1); rss=$(col cstore-pull 2)
sk=$(col skopeo 1); um=$(col umoci 1); skum=$(sum skopeo umoci)
ct=$(col ctr 1)
cu=$(col cstore-unpack 1); curss=$(col cstore-unpack 2)
ua=$(col umoci-alone 1); us=$(col umoci-sync 1)
mib() { echo "$1/1024" | bc -l; }
echo
echo "pull + unpack of $ref (${unpacked} MiB, ${files} inodes unpacked), median of $RUNS runs, cold cache:"
printf '  %-34s %8.2f s   peak RSS %6.1f MiB\n' "(a) cstore pull" "$cs" "$(mib "$rss")"
printf '  %-34s %8.2f s   (skopeo %.2f + umoci %.2f)\n' "(b) skopeo copy + umoci unpack" "$skum" "$sk" "$um"
printf '  %-34s %8.2f s\n' "(c) ctr image pull (containerd 1.6)" "$ct"
printf '  ratio cstore / containerd      %.2f\n' "$(echo "$cs/$ct" | bc -l)"
printf '  ratio cstore / (skopeo+umoci)  %.2f\n' "$(echo "$cs/$skum" | bc -l)"
echo "unpack alone (blobs already local):"
printf '  %-34s %8.2f s   peak RSS %6.1f MiB\n' "(d) cstore unpack" "$cu" "$(mib "$curss")"
printf '  %-34s %8.2f s   (+ sync afterwards %.2f s)\n' "(d) umoci unpack" "$ua" "$us"
printf '  ratio cstore / umoci           %.2f\n' "$(echo "$cu/$ua" | bc -l)"
if [ -n "${CSTORE_BASE:-}" ]; then
  bp=$(col base-pull 1); bu=$(col base-unpack 1)
  echo "base $CSTORE_BASE, same runs:"
  printf '  %-34s %8.2f s   ratio cstore / base %.2f\n' "(a) base pull" "$bp" "$(echo "$cs/$bp" | bc -l)"
  printf '  %-34s %8.2f s   ratio cstore / base %.2f\n' "(d) base unpack" "$bu" "$(echo "$cu/$bu" | bc -l)"
fi
