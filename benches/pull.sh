#!/usr/bin/env bash
# pull.sh - fetch of a multi-layer image (≥ 500 MB unpacked, tens of thousands of
# files) from a registry on 127.0.0.1, in one run: `cstore pull` vs `skopeo copy
# docker://… oci:…` vs `ctr content fetch` (a private containerd 1.6). Prints the
# median of RUNS runs for each, the ratios, and cstore's peak RSS.
#
#   sudo benches/pull.sh            (RUNS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}

bench_setup

for i in $(seq "$RUNS"); do
  rm -rf "$work/cs"
  drop_caches
  t "cstore.$i" "$cstore" --root "$work/cs" pull --no-unpack "$ref"

  rm -rf "$work/sk"
  drop_caches
  t "skopeo.$i" skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/sk:bench"

  stop_containerd "$work/ctrd"; rm -rf "$work/ctrd"
  start_containerd "$work/ctrd"
  drop_caches
  t "ctr.$i" ctr -a "$work/ctrd/containerd.sock" -n bench content fetch --plain-http "$ref"
done

cs=$(col cstore 1); sk=$(col skopeo 1); ct=$(col ctr 1); rss=$(col cstore 2)
unpacked=$(du -sb "$FIXTURES/debootstrap-bookworm" "$(python3 -c 'import sys; print(sys.base_prefix)')" | awk '{s+=$1} END {print int(s/1048576)+64}')
echo
echo "pull of $ref (≈ ${unpacked} MiB unpacked), median of $RUNS runs:"
printf '  %-24s %8.2f s   peak RSS %6.1f MiB\n' "cstore pull" "$cs" "$(echo "$rss/1024" | bc -l)"
printf '  %-24s %8.2f s\n' "skopeo copy" "$sk"
printf '  %-24s %8.2f s\n' "ctr content fetch" "$ct"
printf '  ratio cstore/skopeo %.2f (goal <= 0.70)\n' "$(echo "$cs/$sk" | bc -l)"
printf '  ratio cstore/ctr    %.2f\n' "$(echo "$cs/$ct" | bc -l)"
printf '  cstore peak RSS %.1f MiB (goal <= 64)\n' "$(echo "$rss/1024" | bc -l)"
