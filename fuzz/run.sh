#!/usr/bin/env bash
# run.sh - run the fuzz targets under libFuzzer (cargo-fuzz) one after another.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 300 s each, every target
#
# New inputs go to a scratch corpus ($FUZZ_WORK, default /var/tmp/cstore-fuzz-work/<target>),
# seeded from fuzz/corpus/<target>; crashes to fuzz/artifacts/<target>/. Each run ends
# with libFuzzer's "Done N runs in S second(s)", printed here per target. On a stable
# toolchain cargo-fuzz's nightly flags need RUSTC_BOOTSTRAP=1 (set here).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
work=${FUZZ_WORK:-/var/tmp/cstore-fuzz-work}
export RUSTC_BOOTSTRAP=1
cargo fuzz build
status=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  log=$work/$t.log
  # Per input: 10 s; no single allocation over 64 MiB; 1 GiB in all.
  if cargo fuzz run "$t" "$work/$t" "corpus/$t" -- -max_total_time="$secs" \
      -timeout=10 -malloc_limit_mb=64 -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
    r=ok
  else
    r=FAILED status=1
  fi
  echo "$t: $r, $(grep -E '^Done [0-9]+ runs' "$log" | tail -1) $(grep -E 'stat::peak_rss_mb' "$log" | tail -1 | tr -s ' ')"
done
exit $status
