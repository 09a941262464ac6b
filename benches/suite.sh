#!/usr/bin/env bash
# suite.sh - `cstore bench suite` (release build) on the bench image (or the
# fixtures tag IMAGE, e.g. IMAGE=busybox) served by a registry on 127.0.0.1:
# every class (the device under /var/tmp as it is, and emulated HDD, SATA SSD
# and NVMe-like loop devices), cstore beside containerd 1.6 + runc and fio.
# Writes report.html, report.json and report.md to OUT (default
# ./bench-report) and prints the markdown. Extra arguments go to the suite
# (e.g. --quick, --classes hdd,nvme, --rounds 5).
#
#   sudo benches/suite.sh [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}

bench_setup "${IMAGE:-bench}"
"$cstore" bench suite --image "$ref" --out "${OUT:-$PWD/bench-report}" "$@"
