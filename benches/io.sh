#!/usr/bin/env bash
# io.sh - `cstore bench io` side by side with fio (--ioengine=io_uring, same
# file, block size, queue depth, job count and direct flag), in one run, on:
#   disk   a file on the root disk
#   shm    a loop device backed by a file in /dev/shm (NVMe-class: memory-fast)
#   hdd    a loop device throttled by a v1 blkio cgroup (≈150 IOPS, 150 MB/s: HDD-class)
# Prints IOPS / MB/s per case and the ratio cstore/fio.
#
# Each case runs REPS times (default 3), fio and cstore alternating, and the
# medians are printed. Single-job cases run both tools pinned to one CPU
# (CPUS, default 0): on a small VM an unpinned QD1 figure mostly measures where
# the scheduler puts the submitter and the loop device's worker, and how long
# an idle vCPU takes to wake (here, unpinned fio at shm QD1 swung 35k-57k IOPS
# between runs; with the other vCPU kept busy both tools reached 82k-91k).
#
#   sudo benches/io.sh [RUNTIME_SECONDS]     (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
runtime=${1:-5}
reps=${REPS:-3}
cpus=${CPUS:-0}
pin=()
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}
command -v fio >/dev/null || { apt-get update -qq; apt-get install -y -qq fio >/dev/null; }
cargo build --release --locked -q -p cstore
cstore=$CARGO_TARGET_DIR/release/cstore

work=$(mktemp -d /var/tmp/cstore-io.XXXXXX)
loops=()
cg=/sys/fs/cgroup/blkio/cstore-bench-$$
cleanup() {
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -f /dev/shm/cstore-io-$$.img
  [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

size=512M
truncate -s 0 "$work/disk.img"; head -c 512M /dev/zero > "$work/disk.img"; sync
head -c 512M /dev/zero > /dev/shm/cstore-io-$$.img
shm=$(losetup --find --show --direct-io=off /dev/shm/cstore-io-$$.img); loops+=("$shm")
hddimg=$work/hdd.img; head -c 512M /dev/zero > "$hddimg"
hdd=$(losetup --find --show "$hddimg"); loops+=("$hdd")

# HDD-class: throttle the loop device in a v1 blkio cgroup both tools run in.
mkdir -p "$cg"
majmin=$(lsblk -dno MAJ:MIN "$hdd" | tr -d ' ')
for f in read_iops_device:150 write_iops_device:150 read_bps_device:157286400 write_bps_device:157286400; do
  echo "$majmin ${f#*:}" > "$cg/blkio.throttle.${f%%:*}"
done
incg() { sh -c "echo \$\$ > $cg/cgroup.procs; exec \"\$@\"" sh "$@"; }

fio_iops() { # fio_iops TARGET RW BS QD JOBS DIRECT [cg]
  local t=$1 rw=$2 bs=$3 qd=$4 jobs=$5 direct=$6 wrap=${7:-}
  $wrap "${pin[@]}" fio --name=b --filename="$t" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$jobs" \
    --ioengine=io_uring --direct="$direct" --size=$size --runtime="$runtime" --time_based \
    --group_reporting --output-format=json 2>/dev/null |
    jq -r '.jobs[0] | (.read.iops + .write.iops) as $i | (.read.bw_bytes + .write.bw_bytes) as $b | "\($i) \($b)"'
}
cs_iops() { # same arguments
  local t=$1 rw=$2 bs=$3 qd=$4 jobs=$5 direct=$6 wrap=${7:-} d=()
  [ "$direct" = 1 ] && d=(--direct)
  $wrap "${pin[@]}" "$cstore" bench io --rw "$rw" --bs "$bs" --qd "$qd" --rings "$jobs" --size $size \
    "${d[@]}" --runtime "$runtime" --json "$t" | jq -r '"\(.iops) \(.mb_per_s * 1000000)"'
}

printf '%-6s %-10s %5s %4s %4s | %12s %12s | %12s %12s | %6s\n' target rw bs qd jobs "fio IOPS" "fio MB/s" "cstore IOPS" "cstore MB/s" ratio
row() { # row NAME TARGET RW BS QD JOBS DIRECT [wrap]
  local name=$1; shift
  local i fi fb ci cb fis=() fbs=() cis=() cbs=()
  pin=(taskset -c "$cpus")
  [ "$5" = 1 ] || pin=()
  for i in $(seq "$reps"); do
    read -r fi fb < <(fio_iops "$@")
    read -r ci cb < <(cs_iops "$@")
    fis+=("$fi") fbs+=("$fb") cis+=("$ci") cbs+=("$cb")
  done
  fi=$(printf '%s\n' "${fis[@]}" | median) fb=$(printf '%s\n' "${fbs[@]}" | median)
  ci=$(printf '%s\n' "${cis[@]}" | median) cb=$(printf '%s\n' "${cbs[@]}" | median)
  local ratio
  if [ "$3" = 1m ] || [ "$3" = 1M ]; then ratio=$(echo "$cb / $fb" | bc -l); else ratio=$(echo "$ci / $fi" | bc -l); fi
  printf '%-6s %-10s %5s %4s %4s | %12.0f %12.1f | %12.0f %12.1f | %6.2f\n' "$name" "$2" "$3" "$4" "$5" "$fi" "$(echo "$fb/1000000" | bc -l)" "$ci" "$(echo "$cb/1000000" | bc -l)" "$ratio"
}

for qd in 1 32 128; do row disk "$work/disk.img" randread 4k $qd 1 1; done
row disk "$work/disk.img" read 1m 8 1 1
for qd in 1 32 128; do row shm "$shm" randread 4k $qd 1 1; done
row shm "$shm" randread 4k 32 2 1
row shm "$shm" read 1m 8 1 1
for qd in 1 32; do row hdd "$hdd" randread 4k $qd 1 1 incg; done
row hdd "$hdd" read 1m 8 1 1 incg
echo "(medians of $reps alternating runs of ${runtime}s; single-job cases pinned to CPU $cpus; ratio: cstore/fio IOPS for 4k, throughput for 1m; goal >= 1.0)"
