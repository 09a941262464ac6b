#!/usr/bin/env bash
# hddpolicy.sh - the HDD (rotational) policy against the NVMe policy on a
# hand-made copy of the suite's emulated HDD class: ext4 (no lazy init) on a
# loop device over a sparse file on a tmpfs, queue/rotational=1, and a v1
# blkio cgroup throttling the loop device to 150 IOPS and 150 MB/s per
# direction, which cstore runs in. Per run it prints the wall time, what the
# throttle charged the cgroup (blkio.throttle.io_serviced/io_service_bytes:
# bios as submitted, before the block layer merges them) and what the loop
# device completed (/sys/block/loopN/stat: requests after merging, what a
# disk would have seen), reads and writes.
#
# Cold cache without dropping the whole machine's page cache: the class's
# filesystem is unmounted and mounted again before each measured run (that
# evicts its inodes and pages, and the last close of the loop device drops
# its buffer cache).
#
#   sudo benches/hddpolicy.sh [unpack|pull]...   (default: unpack)
#     unpack: unpack alone, from a copy of a store that has the blobs
#     pull:   pull + unpack into a fresh store
#   ROUNDS=3 (rounds; within one, every binary and policy in turn)
#   BINS="new=PATH [main=PATH]..." (default: new=$CARGO_TARGET_DIR/release/cstore);
#   an entry name=PATH@POLICY runs that build with that policy only
#   POLICIES="rotational nvme" (CSTORE_POLICY values)
#   IMAGE=bench (fixtures tag)
#   TRACE=1: who submits which requests, not how long they take: the limits
#   are lifted (a throttled bio is submitted later from the throttle's worker,
#   its stack lost; the cgroup still counts what it would charge), and every
#   bio the loop device queues (tracepoint block:block_bio_queue with a kernel
#   stack) goes to $OUT/MODE-BIN-POLICY-ROUND.trace, summarised by submitter
#   and stack (benches/biostacks.py) after each run
#   OUT=dir for logs (default: a temp dir, printed)
#   MODEL=1: the class is the suite's seek-modelled HDD instead (the loop
#   device, --direct-io=on, over the file of `cstore bench hdd-model`, a
#   FUSE file served after a 7200 rpm disk's seek + rotation + transfer
#   time; no throttle). Per run it also prints what the model served:
#   requests, seeks and the modelled busy time (from its counters).
#   MODEL_BIN=the cstore that serves the model (default: the first of BINS)
#   SCHED_TUNE="write_expire=60000 fifo_batch=64": the scheduler's tunables
#   (queue/iosched/) on the class's loop device, after SCHED
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}
ROUNDS=${ROUNDS:-3}
POLICIES=${POLICIES:-rotational nvme}
BINS=${BINS:-new=$CARGO_TARGET_DIR/release/cstore}
MODES=${*:-unpack}
tag=${IMAGE:-bench}

if [ "$tag" = bench ]; then bench_image; else bash fixtures/images.sh >/dev/null; fi
work=$(mktemp -d /var/tmp/cstore-hddpolicy.XXXXXX)
OUT=${OUT:-$work/out}
mkdir -p "$OUT"
mnt=$work/hdd tmpfs=$work/tmpfs dev= cg= model_pid= modelmnt=$work/model

cleanup() {
  set +e
  if [ -n "${tr:-}" ] && [ -d "$tr" ]; then
    echo 0 > "$tr/tracing_on"; echo 0 > "$tr/events/block/block_bio_queue/enable"
    rmdir "$tr"
  fi
  mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$dev" ] && losetup -d "$dev"
  if [ -n "$model_pid" ]; then
    kill -TERM "$model_pid"; wait "$model_pid"
    mountpoint -q "$modelmnt" && umount "$modelmnt"
  fi
  [ -n "$cg" ] && [ -d "$cg" ] && rmdir "$cg"
  mountpoint -q "$tmpfs" && umount "$tmpfs"
  bash fixtures/registry.sh stop "$work/reg"
  [ "$OUT" = "$work/out" ] && { mkdir -p /var/tmp/cstore-hddpolicy-logs; cp -a "$OUT"/. /var/tmp/cstore-hddpolicy-logs/; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_serve "$tag"

mkdir -p "$tmpfs" "$mnt"
mount -t tmpfs -o size=$(((16 << 30) + (64 << 20))),mode=0700 tmpfs "$tmpfs"
first_bin=${BINS%% *}
first_bin=${first_bin#*=}
first_bin=${first_bin%@*}
if [ -n "${MODEL:-}" ]; then
  mkdir -p "$modelmnt"
  "${MODEL_BIN:-$first_bin}" bench hdd-model --backing "$tmpfs/hdd.img" --size 16g --stats "$work/model-stats.json" "$modelmnt" \
    >"$OUT/model.json" 2>"$OUT/model.log" &
  model_pid=$!
  for _ in $(seq 50); do [ -e "$modelmnt/disk" ] && break; sleep 0.1; done
  dev=$(losetup --find --show --direct-io=on "$modelmnt/disk")
else
  truncate -s 16G "$tmpfs/hdd.img"
  dev=$(losetup --find --show --direct-io=off "$tmpfs/hdd.img")
fi
name=$(basename "$dev")
echo 1 > "/sys/block/$name/queue/rotational"
# As the suite's HDD class: a disk's scheduler (SCHED=none for the loop default).
[ -n "${MODEL:-}" ] && echo "${SCHED:-mq-deadline}" > "/sys/block/$name/queue/scheduler"
for kv in ${SCHED_TUNE:-}; do echo "${kv#*=}" > "/sys/block/$name/queue/iosched/${kv%%=*}"; done
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
mount "$dev" "$mnt"
majmin=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
cg=/sys/fs/cgroup/blkio/cstore-hddpolicy-$$
mkdir "$cg"
iops=150 bps=150000000
[ -n "${TRACE:-}${MODEL:-}" ] && iops=1000000 bps=1000000000000
for f in read_iops write_iops; do echo "$majmin $iops" > "$cg/blkio.throttle.${f}_device"; done
for f in read_bps write_bps; do echo "$majmin $bps" > "$cg/blkio.throttle.${f}_device"; done

# in_cg CMD...: CMD in the throttled cgroup
in_cg() { sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@"; }

cold() {
  sync -f "$mnt"
  umount "$mnt"
  mount "$dev" "$mnt"
}

# counters: charged read ios, read bytes, write ios, write bytes; then the
# loop device's completed reads, read sectors, writes, written sectors
counters() {
  local s
  s=$(awk -v d="$majmin" '$1 == d && $2 == "Read" {r=$3} $1 == d && $2 == "Write" {w=$3} END {printf "%.0f %.0f\n", r, w}' "$cg/blkio.throttle.io_serviced")
  set -- $s
  local ri=$1 wi=$2
  s=$(awk -v d="$majmin" '$1 == d && $2 == "Read" {r=$3} $1 == d && $2 == "Write" {w=$3} END {printf "%.0f %.0f\n", r, w}' "$cg/blkio.throttle.io_service_bytes")
  set -- $s
  local rb=$1 wb=$2
  set -- $(cat "/sys/block/$name/stat")
  echo "$ri $rb $wi $wb $1 $3 $5 $7"
}

report() { # label seconds before after
  local label=$1 secs=$2
  read -r a1 a2 a3 a4 a5 a6 a7 a8 <<<"$3"
  read -r b1 b2 b3 b4 b5 b6 b7 b8 <<<"$4"
  awk -v l="$label" -v s="$secs" \
    -v ri=$((b1 - a1)) -v rb=$((b2 - a2)) -v wi=$((b3 - a3)) -v wb=$((b4 - a4)) \
    -v dr=$((b5 - a5)) -v ds=$((b6 - a6)) -v dw=$((b7 - a7)) -v dws=$((b8 - a8)) 'BEGIN {
      printf "%-24s %7.1f s  charged: %6d reads %6.1f MB (%5.0f KiB avg), %6d writes %6.1f MB  device: %6d reads (%5.0f KiB avg), %6d writes (%5.0f KiB avg)\n",
        l, s, ri, rb / 1e6, ri ? rb / ri / 1024 : 0, wi, wb / 1e6,
        dr, dr ? ds * 512 / dr / 1024 : 0, dw, dw ? dws * 512 / dw / 1024 : 0 }'
}

tr=
if [ -n "${TRACE:-}" ]; then
  tr=/sys/kernel/tracing/instances/hddpolicy-$$
  devt=$(( (${majmin%:*} << 20) | ${majmin#*:} ))
  mkdir "$tr"
  echo 0 > "$tr/tracing_on"
  echo 65536 > "$tr/buffer_size_kb"
  echo 1 > "$tr/options/stacktrace"
  echo "dev == $devt" > "$tr/events/block/block_bio_queue/filter"
  echo 1 > "$tr/events/block/block_bio_queue/enable"
fi

if [ -n "${MODEL:-}" ]; then what="on the HDD model (cstore bench hdd-model), no throttle"; else what="on tmpfs, 150 IOPS / 150 MB/s"; fi
echo "image $ref; class: $dev ($majmin) ext4 $what, rotational=1, scheduler $(grep -o '\[[^]]*\]' "/sys/block/$name/queue/scheduler") ${SCHED_TUNE:-}; load $(cut -d' ' -f1-3 /proc/loadavg)"
in_cg "$first_bin" --root "$mnt/blobs" pull --no-unpack "$ref" >/dev/null
for mode in $MODES; do
  for r in $(seq "$ROUNDS"); do
    for b in $BINS; do
      bname=${b%%=*} bin=${b#*=}
      pols=$POLICIES
      # name=path@policy: that build with that policy only
      case $bin in *@*) pols=${bin##*@} bin=${bin%@*} ;; esac
      for p in $pols; do
        label="$mode $bname $p #$r"
        rm -rf "$mnt/root"
        if [ "$mode" = unpack ]; then cp -a "$mnt/blobs" "$mnt/root"; fi
        fstrim "$mnt" 2>/dev/null || true
        cold
        log=$OUT/$mode-$bname-$p-$r.log
        cmd=(env CSTORE_POLICY="$p" "$bin" --root "$mnt/root")
        if [ "$mode" = unpack ]; then cmd+=(unpack "$ref"); else cmd+=(pull "$ref"); fi
        [ -n "$tr" ] && { echo > "$tr/trace"; echo 1 > "$tr/tracing_on"; }
        c0=$(counters)
        m0='{"reads":0,"read_bytes":0,"writes":0,"write_bytes":0,"seeks":0,"busy_us":0}'
        if [ -n "$model_pid" ]; then sleep 0.3; [ -e "$work/model-stats.json" ] && m0=$(cat "$work/model-stats.json"); fi
        t0=$(date +%s.%N)
        in_cg "${cmd[@]}" >"$log" 2>&1 || { echo "$label failed:" >&2; tail -5 "$log" >&2; exit 1; }
        t1=$(date +%s.%N)
        c1=$(counters)
        report "$label" "$(echo "$t1 - $t0" | bc)" "$c0" "$c1"
        if [ -n "$model_pid" ]; then
          sleep 0.3
          python3 - "$m0" "$work/model-stats.json" <<'PY'
import json, sys
a = json.loads(sys.argv[1]); b = json.load(open(sys.argv[2]))
d = {k: b[k] - a[k] for k in b}
print("    model: %d reads %.1f MB, %d writes %.1f MB, %d seeks, busy %.1f s" % (
    d["reads"], d["read_bytes"] / 1e6, d["writes"], d["write_bytes"] / 1e6, d["seeks"], d["busy_us"] / 1e6))
PY
        fi
        if [ -n "$tr" ]; then
          echo 0 > "$tr/tracing_on"
          cat "$tr/trace" > "$OUT/$mode-$bname-$p-$r.trace"
          python3 benches/biostacks.py "$OUT/$mode-$bname-$p-$r.trace" | sed 's/^/    /'
        fi
      done
    done
  done
done
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg); logs in $OUT"
