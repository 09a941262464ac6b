#!/usr/bin/env bash
# lazy.sh - cold start of the bench image (benches/lib.sh: 3 gzip layers,
# ~307 MB) from a registry on 127.0.0.1, lazy pullers against full pulls, in
# one run (issues #14 and #15):
#   cstore        cstore pull + cstore run --rm                 (full; fresh store)
#   stargz        ctr-remote image rpull + ctr run --snapshotter stargz: the
#                 eStargz conversion of the image, stargz-snapshotter lazy (the
#                 peer built by ../shared/peers/stargz/build.sh) in a private
#                 containerd 1.6
#   ctr           ctr image pull + ctr run (containerd 1.6, overlayfs; full)
#   ctr+cs        ctr image pull + ctr run through cstore's snapshotter (full)
#   cstore-lazy   cstore pull --lazy + cstore run --lazy        } only when
#   ctr+cs-lazy   ctr-remote image rpull --snapshotter cstore   } `cstore pull
#                 + ctr run, cstore's snapshotter serve --lazy  } --help` has
#                 on an empty store (a fresh node)              } --lazy
# Each run starts from nothing: a fresh store, containerd and snapshotter, the
# page cache dropped (then the tools' binaries read back in: cold is the image's data,
# not ctr's or cstore's code). The workloads are `true` and a python import workload
# (the peers README's: CPython at /opt/python) that prints a line when the
# interpreter is up and one when its imports are done. Timed from the spawn of
# each command (benches/runlat.py --once): the pull, then the run to its first
# output and to its exit; totals are pull + run. Bytes fetched are counted by
# benches/rateproxy.py, which every tool pulls through (registry -> client
# bytes at the run's exit, HTTP headers included), and which also limits the
# bandwidth: LINKS lists the links in Mbit/s, 0 = unlimited.
# RUNS rounds; a round runs every link, case and workload once (the case order
# rotating from round to round), so they share the machine's noise. Prints
# medians with [min-max] and the ratios of the lazy goals.
#
# Then the read throughput of a completed lazy layer against the same files
# on an unpacked layer (READ=0 skips it): 1 MiB sequential and 4 KiB random
# reads of /data/random.bin (fio --readonly, buffered and O_DIRECT; `cstore
# bench io --direct`) and a read of every file under /opt/python, REPS times,
# the page cache of the backing files checked before and after each (see
# read_side).
#
# Then the stall a container sees while the lazy daemon restarts under it
# (through containerd, STALL=0 skips it): read latency p50/max, and the
# longest read across each kill -9.
#
#   sudo benches/lazy.sh      (RUNS=3 LINKS="0 1000 100" WORKLOADS="true python"
#                              CASES="cstore stargz ctr ctr+cs cstore-lazy ctr+cs-lazy"
#                              STALL=1 KILLS=5 STALL_FILES=3000 READ=1 REPS=3 TRACE=0)
#
# STRACE=1 with LOGS=DIR keeps an strace timeline of each pull and run (see measure).
# SPAN_KIB=N builds the indexes with spans of N KiB (`index build --span-kib`;
# default 128).
# TRACE=1 pushes an access trace of the python workload with the index (see
# lazy_setup): a second figure, not the one to compare with plain eStargz.
#
# The eStargz conversion takes minutes; it is cached in the fixtures directory
# (bench_esgz_image in benches/lib.sh). The stargz peer is built once into
# /var/tmp/stargz-peer (STARGZ_GRPC=PATH uses another build).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
LINKS=${LINKS:-0 1000 100}
WORKLOADS=${WORKLOADS:-true python}
CASES=${CASES:-cstore stargz ctr ctr+cs cstore-lazy ctr+cs-lazy}
READ=${READ:-1}
REPS=${REPS:-3}
STALL=${STALL:-1}
KILLS=${KILLS:-5}
STALL_FILES=${STALL_FILES:-3000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}
shared=${CSTORE_SHARED:-$(cd .. && pwd)/shared}
sgz_bin=${STARGZ_GRPC:-/var/tmp/stargz-peer/containerd-stargz-grpc}

# --- setup ------------------------------------------------------------------
bench_setup
cstore=$(readlink -f "$cstore")  # the lazy daemons are found by their argv, which names the real path
if [ ! -x "$sgz_bin" ] || [ "$shared/peers/stargz/main.go" -nt "$sgz_bin" ]; then
  bash "$shared/peers/stargz/build.sh" "$sgz_bin" >/dev/null
fi
bench_esgz_image
skopeo copy -q --dest-tls-verify=false "oci:$FIXTURES/bench-estargz:bench" "docker://$addr/bench:esgz"
want=$(skopeo inspect --raw "oci:$FIXTURES/bench-estargz:bench" | sha256sum | cut -d' ' -f1)
got=$(skopeo inspect --raw --tls-verify=false "docker://$addr/bench:esgz" | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] || { echo "eStargz image changed on the way to the registry ($want -> $got)" >&2; exit 1; }

proxy_pid= snap_pid= sgz_pid=
cleanup() {
  stop_all
  stop_lazy_daemon "$work/read-lazy"
  [ -z "$proxy_pid" ] || { kill "$proxy_pid" 2>/dev/null; wait "$proxy_pid" 2>/dev/null || true; }
  umount_under "$work"
  bench_cleanup
}
trap cleanup EXIT

python3 benches/rateproxy.py --upstream "$addr" --portfile "$work/proxy.ports" > "$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 100); do [ -s "$work/proxy.ports" ] && break; sleep 0.1; done
read -r pport cport < "$work/proxy.ports"
paddr=127.0.0.1:$pport
proxy() { curl -sf -X "$1" "http://127.0.0.1:$cport/$2"; }
gz=$paddr/bench:latest    # what every full pull and cstore's lazy pull fetch
esgz=$paddr/bench:esgz    # what stargz fetches
echo "eStargz image $addr/bench:esgz: $(( $(skopeo inspect --raw --tls-verify=false "docker://$addr/bench:esgz" | jq '[.layers[].size] | add') >> 20 )) MiB compressed; tools pull through the proxy at $paddr"

# `cstore pull --help` says whether lazy pulls exist yet: the lazy cases run only then.
lazy=0
"$cstore" pull --help 2>/dev/null | grep -q -- '--lazy' && lazy=1

py_env=(PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        LD_LIBRARY_PATH=/opt/python/lib)  # libpython's RPATH points at the build host
wl_argv() {
  case $1 in
    true) echo true ;;
    python) echo "python3 -c 'print(\"started\", flush=True); import asyncio, email.mime.multipart, http.client, json, xml.dom.minidom, unittest, argparse, decimal; print(\"imported\")'" ;;
  esac
}
wl_expect() { [ "$1" = python ] && echo imported || echo ""; }

# --- per-case state -----------------------------------------------------------
# Each case: prep_X (fresh state, untimed), pull_X / run_X WORKLOAD ID (print
# the command, timed), stop_all tears everything down. ctr and ctr+cs share a
# private containerd at $work/ctrd; snapshotters get roots of their own.
ctr=(ctr -a "$work/ctrd/containerd.sock" -n bench)
ctr_env() { for e in "${py_env[@]}"; do printf -- '--env %q ' "$e"; done; }
cs_env() { for e in "${py_env[@]}"; do printf -- '-e %q ' "$e"; done; }

stop_all() {
  stop_containerd "$work/ctrd" || true
  if [ -n "$sgz_pid" ]; then  # SIGINT: it unmounts its FUSE layers first
    kill -INT "$sgz_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$sgz_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$sgz_pid" 2>/dev/null || true; wait "$sgz_pid" 2>/dev/null || true
    sgz_pid=
  fi
  if [ -n "$snap_pid" ]; then
    kill "$snap_pid" 2>/dev/null || true; wait "$snap_pid" 2>/dev/null || true
    snap_pid=
  fi
  stop_lazy_daemon "$work/state/cs"
  umount_under "$work/ctrd"; umount_under "$work/state"
  rm -rf "$work/ctrd" "$work/state"
}

# stop_lazy_daemon ROOT: end the lazy keeper and daemon `run --lazy` / `mount --lazy`
# started for the store at ROOT (found by its exact argv; it runs detached),
# keeping its log as LOGS/<link>-<case>-<workload>-<round>.daemon.log when LOGS
# names a directory.
stop_lazy_daemon() {
  local root=$1 p want role
  # The keeper first: it would restart the daemon.
  for role in lazy-keeper lazy-serve; do
    want="$cstore"$'\n'"--root"$'\n'"$root"$'\n'"$role"
    for p in /proc/[0-9]*; do
      [ "$({ tr '\0' '\n' < "$p/cmdline"; } 2>/dev/null | head -4)" = "$want" ] || continue
      kill "${p#/proc/}" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "${p#/proc/}" 2>/dev/null || break; sleep 0.1; done
      kill -9 "${p#/proc/}" 2>/dev/null || true
    done
  done
  if [ -n "${LOGS:-}" ] && [ -f "$root/lazy/daemon.log" ]; then
    mkdir -p "$LOGS"; cp "$root/lazy/daemon.log" "$LOGS/${cur_id:-x}.daemon.log"
    # With each layer's access trace (the spans reads needed) and index, what
    # `lazy.py fetches` needs to tell the spans read from those fetched unread.
    local t h ix
    for t in "$root"/lazy/*/cache/trace; do
      [ -f "$t" ] || continue
      h=$(basename "$(dirname "$(dirname "$t")")")
      cp "$t" "$LOGS/${cur_id:-x}.${h:0:12}.trace"
      ix=$("$cstore" --root "$root" index ls --json "$gz" 2>/dev/null |
        jq -r --arg l "sha256:$h" '.[] | select(.layer == $l) | .index.digest // empty' || true)
      [ -z "$ix" ] || cp "$root/blobs/sha256/${ix#sha256:}" "$LOGS/${cur_id:-x}.${h:0:12}.index" 2>/dev/null || true
    done
  fi
}

start_cstore_snapshotter() { # [--lazy]
  mkdir -p "$work/state"
  "$cstore" --root "$work/state/cs" snapshotter serve --address "$work/state/cs.sock" "$@" 2>"$work/state/cs.log" &
  snap_pid=$!
  wait_socket "$work/state/cs.sock" "$work/state/cs.log"
  start_containerd "$work/ctrd" "[proxy_plugins.cstore]
  type = \"snapshot\"
  address = \"$work/state/cs.sock\""
}

start_stargz() {
  local mport
  mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$work/state"
  printf 'metrics_address = "127.0.0.1:%s"\n' "$mport" > "$work/state/sgz.toml"
  echo "$mport" > "$work/state/sgz.port"
  "$sgz_bin" -address "$work/state/sgz.sock" -root "$work/state/sgz" -config "$work/state/sgz.toml" \
    -log-level warn 2>"$work/state/sgz.log" &
  sgz_pid=$!
  wait_socket "$work/state/sgz.sock" "$work/state/sgz.log"
  start_containerd "$work/ctrd" "[proxy_plugins.stargz]
  type = \"snapshot\"
  address = \"$work/state/sgz.sock\""
}

prep_cstore() { mkdir -p "$work/state"; }
pull_cstore() { echo "$cstore --root $work/state/cs pull $gz"; }
run_cstore() { echo "$cstore --root $work/state/cs run --rm $(cs_env) $gz $(wl_argv "$1")"; }

prep_stargz() { start_stargz; }
pull_stargz() { echo "ctr-remote -a $work/ctrd/containerd.sock -n bench image rpull --plain-http $esgz"; }
run_stargz() { echo "${ctr[*]} run --rm --snapshotter stargz $(ctr_env) $esgz $2 $(wl_argv "$1")"; }

prep_ctr() { start_containerd "$work/ctrd"; }
pull_ctr() { echo "${ctr[*]} image pull --plain-http $gz"; }
run_ctr() { echo "${ctr[*]} run --rm $(ctr_env) $gz $2 $(wl_argv "$1")"; }

prep_ctr+cs() { start_cstore_snapshotter; }
pull_ctr+cs() { echo "${ctr[*]} image pull --plain-http --snapshotter cstore $gz"; }
run_ctr+cs() { echo "${ctr[*]} run --rm --snapshotter cstore $(ctr_env) $gz $2 $(wl_argv "$1")"; }

# --- cstore's lazy cases (#14, #15) ---------------------------------------------
# They run when `cstore pull --help` lists --lazy. lazy_setup runs once
# before the rounds, untimed: every layer's index built from the registry and
# pushed beside the image (referrers tag schema on distribution 2.8), as #14's
# benchmark says; each run then starts from a fresh store that has nothing but
# what `pull --lazy` finds in the registry. `run --lazy` starts the store's
# lazy daemon (detached, its log in ROOT/lazy/daemon.log); stop_all ends it.
# TRACE=1 also records an access trace and pushes it with the index: one
# untimed lazy run of the python workload in the index store, then a second
# push. stargz's image is converted plainly (no `ctr-remote image optimize`),
# so the comparison with stargz is fair only without it (the default).
lazy_setup() {
  "$cstore" --root "$work/index" index build ${SPAN_KIB:+--span-kib "$SPAN_KIB"} "$addr/bench:latest" >/dev/null
  if [ "${TRACE:-0}" = 1 ]; then
    "$cstore" --root "$work/index" pull --lazy "$addr/bench:latest" >/dev/null
    # Through a pipe: the container gets no /dev/null of the host as its stdout.
    eval "$cstore --root $work/index run --rm --lazy $(cs_env) $addr/bench:latest $(wl_argv python)" | cat >/dev/null
    stop_lazy_daemon "$work/index"
    umount_under "$work/index"
  fi
  "$cstore" --root "$work/index" index push "$addr/bench:latest"
}
prep_cstore-lazy() { mkdir -p "$work/state"; }
pull_cstore-lazy() { echo "$cstore --root $work/state/cs pull --lazy $gz"; }
run_cstore-lazy() { echo "$cstore --root $work/state/cs run --rm --lazy $(cs_env) $gz $(wl_argv "$1")"; }
# Through containerd (#15), a fresh node: containerd 1.6 with cstore's proxy
# snapshotter started as `snapshotter serve --lazy` on an empty store (no
# `cstore pull --lazy` first). `ctr-remote image rpull` pulls with
# containerd's unpacker and the layer labels (as CRI does; `ctr image pull`
# would fetch every blob first): each layer's Prepare names the image and
# layer, the snapshotter finds the index artifact in the registry and
# answers AlreadyExists, and `ctr run`'s mounts put the layers' FUSE mounts
# (the store's lazy daemon, started by the snapshotter) under the overlay.
prep_ctr+cs-lazy() { start_cstore_snapshotter --lazy; }
pull_ctr+cs-lazy() { echo "ctr-remote -a $work/ctrd/containerd.sock -n bench image rpull --plain-http --snapshotter cstore $gz"; }
run_ctr+cs-lazy() { echo "${ctr[*]} run --rm --snapshotter cstore $(ctr_env) $gz $2 $(wl_argv "$1")"; }

# extra CASE: a figure of the tool's own after the run, or "-": for stargz its
# metric of bytes fetched on demand (prefetch and background fetch are not in
# it; the proxy's count has them).
extra() {
  if [ "$1" = stargz ] && [ -f "$work/state/sgz.port" ]; then
    curl -sf "127.0.0.1:$(cat "$work/state/sgz.port")/metrics" > "$work/state/sgz.metrics" || true
    awk '/^stargz_fs_bytes_served\{.*operation_type="on_demand_bytes_fetched"/ {s += $NF; k = 1}
         END {if (k) printf "%d\n", s; else print "-"}' "$work/state/sgz.metrics"
  else
    echo -
  fi
}

results=$work/results.tsv
: > "$results"
n=0
measure() { # measure LINK CASE WORKLOAD ROUND
  local link=$1 c=$2 wl=$3 round=$4 id pull run p r bytes x
  n=$((n + 1)); id=lz$n; cur_id=$link-$c-$wl-$round
  "prep_$c"
  drop_caches
  # The tools' own binaries back in the page cache: a node that starts
  # containers has them there; cold is the image's data.
  cat "$cstore" "$(command -v ctr)" "$(command -v ctr-remote)" "$(command -v runc)" \
    "$(command -v containerd-shim-runc-v2)" > /dev/null
  proxy POST reset >/dev/null
  eval "pull=($(pull_"$c"))"
  # STRACE=1 (with LOGS): the pull's and the run's process and mount syscalls,
  # with wall-clock times, as LOGS/<id>.{pull,run}.strace: a timeline beside the
  # daemon's log (which has its mounts). Children are followed up to their
  # execve (the keeper's, the container's), so the strace ends with the command.
  local st=()
  if [ "${STRACE:-0}" = 1 ] && [ -n "${LOGS:-}" ]; then
    mkdir -p "$LOGS"
    st=(strace -f -b execve -tt --seccomp-bpf -e trace=process,mount -o "$LOGS/$cur_id.pull.strace")
    pull=("${st[@]}" "${pull[@]}")
  fi
  p=$(python3 benches/runlat.py --once -- "${pull[@]}" 2>"$work/err") ||
    { echo "$c: pull failed: $(cat "$work/err")" >&2; exit 1; }
  eval "run=($(run_"$c" "$wl" "$id"))"
  [ ${#st[@]} = 0 ] || run=("${st[@]:0:${#st[@]}-1}" "$LOGS/$cur_id.run.strace" "${run[@]}")
  r=$(python3 benches/runlat.py --once --expect "$(wl_expect "$wl")" -- "${run[@]}" 2>"$work/err") ||
    { echo "$c: run failed: $(cat "$work/err")" >&2; exit 1; }
  bytes=$(proxy GET stats | jq .down)
  x=$(extra "$c")
  stop_all
  read -r _ pull_s _ <<<"$p"
  read -r first exit_s ok <<<"$r"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$link" "$c" "$wl" "$round" "$pull_s" "$first" "$exit_s" "$ok" "$bytes" "$x" >> "$results"
  printf '  %-5s %-12s %-7s pull %6.2f s  run %6.2f s  %7.1f MB\n' "$link" "$c" "$wl" "$pull_s" "$exit_s" "$(echo "$bytes/1000000" | bc -l)" >&2
}

cases=()
for c in $CASES; do
  case $c in
    cstore-lazy|ctr+cs-lazy)
      if [ "$lazy" = 0 ]; then echo "$c: not available yet (\`cstore pull --help\` has no --lazy)"
      else cases+=("$c"); fi ;;
    cstore|stargz|ctr|ctr+cs) cases+=("$c") ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done
# (READ's lazy side mounts the image lazily too: without the pushed index its
# layers would be pulled whole, and the "lazy" figures would be an unpacked layer's.)
if [ "$lazy" = 1 ] && { [[ " ${cases[*]} " == *-lazy* ]] || [ "$STALL" = 1 ] || [ "$READ" = 1 ]; }; then lazy_setup; fi

echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start; $RUNS rounds of links {$LINKS} Mbit/s (0 = unlimited) x {${cases[*]}} x {$WORKLOADS}"
for round in $(seq "$RUNS"); do
  # rotate the case order so no case always runs first after a link change
  k=$(( (round - 1) % ${#cases[@]} ))
  order=("${cases[@]:k}" "${cases[@]:0:k}")
  for link in $LINKS; do
    proxy POST "rate?mbit=$link" >/dev/null
    for c in "${order[@]}"; do
      for wl in $WORKLOADS; do measure "$link" "$c" "$wl" "$round"; done
    done
  done
done
proxy POST "rate?mbit=0" >/dev/null
echo "load average $(cut -d' ' -f1-3 /proc/loadavg) at the end of the rounds"
python3 benches/lazy.py table --lazy "$lazy" "$results"

# --- the restart stall through containerd (#15; STALL=0 skips it) -------------
# containerd + `snapshotter serve --lazy` on a fresh store, the bench image
# rpulled and a container (`ctr run`) reading the first STALL_FILES files
# under /opt/python/lib in a loop (benches/stallread.py, timing each read);
# once its first loop has fetched them, the lazy daemon the snapshotter
# started is killed (-9) KILLS times, 2 s apart (its keeper restarts it); then
# the reader finishes its loop. Unlimited link.
stall() {
  local out=$work/stall.out kills=$work/stall.kills run_pid old pid t0 task i e
  local envs=()
  for e in "${py_env[@]}"; do envs+=(--env "$e"); done
  cur_id=stall
  start_cstore_snapshotter --lazy
  proxy POST "rate?mbit=0" >/dev/null
  # containerd may dial the plugin before it listens: retried.
  for i in $(seq 30); do
    ctr-remote -a "$work/ctrd/containerd.sock" -n bench image rpull --plain-http --snapshotter cstore "$gz" \
      >/dev/null 2>"$work/err" && break
    [ "$i" = 30 ] && { echo "stall: rpull failed: $(cat "$work/err")" >&2; return 1; }
    sleep 1
  done
  "${ctr[@]}" run --rm --snapshotter cstore "${envs[@]}" "$gz" stall \
    python3 -c "$(cat benches/stallread.py)" /opt/python/lib "$STALL_FILES" > "$out" 2>&1 &
  run_pid=$!
  for i in $(seq 1200); do
    grep -q "first loop done" "$out" && break
    kill -0 "$run_pid" 2>/dev/null || { echo "stall: the reader ended: $(tail -5 "$out")" >&2; return 1; }
    sleep 0.5
  done
  : > "$kills"
  for i in $(seq "$KILLS"); do
    sleep 2
    old=$(cat "$work/state/cs/lazy/daemon.pid")
    t0=$(date +%s.%N)
    kill -9 "$old"
    for _ in $(seq 3000); do
      pid=$(cat "$work/state/cs/lazy/daemon.pid" 2>/dev/null || true)
      [ -n "$pid" ] && [ "$pid" != "$old" ] && kill -0 "$pid" 2>/dev/null && break
      sleep 0.01
    done
    echo "$t0 $(date +%s.%N)" >> "$kills"
  done
  sleep 2
  task=$("${ctr[@]}" task ls | awk '$1 == "stall" {print $2}')
  touch "/proc/$task/root/stop"
  wait "$run_pid" || { echo "stall: ctr run failed: $(tail -5 "$out")" >&2; return 1; }
  python3 benches/lazy.py stall "$out" "$kills"
  stop_all
}
if [ "$STALL" = 1 ] && [ "$lazy" = 1 ]; then
  stall
fi

# --- read throughput of a completed lazy layer (#14's goal: >= 0.9x unpacked) ----
# Like for like: the same file (/data/random.bin, 64 MiB) read the same way on
# both sides, in two modes, and the cache state of the file that holds the
# bytes on the store's disk (the "backing" file: the unpacked layer's file under
# snapshots/<id>/fs, or the completed lazy layer's, which FUSE passthrough
# reads) checked with fincore before and after every read:
#   buffered  page cache, one pass over the file (fio --size=64m without
#             --time_based: a time-based run re-reads a 64 MiB file from the
#             cache after its first pass, which is what the figures before
#             this measured), cold: the backing file has 0 bytes cached before
#   direct    O_DIRECT (fio --direct=1, `cstore bench io --direct`), time-based:
#             the backing file has 0 bytes cached after as well if O_DIRECT
#             reached the disk on that side
# and the tree read (every file under /opt/python, buffered), after checking
# that no file of the backing tree has a byte cached. Each line of read.txt:
# SIDE WHAT MODE MB/S CACHED_BEFORE CACHED_AFTER (bytes of the backing file or
# tree).
cached() { # cached PATH: bytes of the file, or of the files below the directory, in the page cache
  if [ -d "$1" ]; then
    find "$1" -xdev -type f -print0 | xargs -0 -r fincore -b -n -o RES | awk '{s += $1} END {print s + 0}'
  else
    fincore -b -n -o RES "$1"
  fi
}
read_one() { # read_one SIDE WHAT MODE BACKING CMD...: one cold read, its line in read.txt
  local side=$1 what=$2 mode=$3 backing=$4 before mb
  shift 4
  drop_caches
  before=$(cached "$backing")
  # the check above read directory blocks and inodes of the backing tree: drop again
  drop_caches
  mb=$("$@") || mb=-
  echo "$side $what $mode ${mb:--} $before $(cached "$backing")" >> "$work/read.txt"
}
fio_mb() { # fio_mb FILE ARGS...: MB/s of a read job
  local f=$1
  shift
  fio --name=r --filename="$f" --readonly --size=64m --output-format=json "$@" 2>/dev/null | jq '.jobs[0].read.bw_bytes / 1e6'
}
read_side() { # read_side SIDE DIR ROOT: measure the mounted image at DIR (its store at ROOT)
  local side=$1 dir=$2 root=$3 f=$2/data/random.bin bf bt i
  bf=$(find "$root/snapshots" -xdev -path '*/fs/data/random.bin' -type f | head -1)
  bt=$(find "$root/snapshots" -xdev -path '*/fs/opt/python' -type d -prune | head -1)
  [ -n "$bf" ] && [ -n "$bt" ] || { echo "read: no backing file or tree under $root/snapshots" >&2; return 1; }
  for i in $(seq "$REPS"); do
    read_one "$side" seq-1m-fio buffered "$bf" fio_mb "$f" --rw=read --bs=1m --iodepth=8 --ioengine=io_uring
    read_one "$side" rand-4k-fio buffered "$bf" fio_mb "$f" --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring
    # one read in flight, and QD8 without fio's POSIX_FADV_SEQUENTIAL (which reaches ext4
    # on the unpacked side only): what the io_uring row's gap is made of
    read_one "$side" seq-1m-fio-qd1 buffered "$bf" fio_mb "$f" --rw=read --bs=1m --iodepth=1 --ioengine=io_uring
    read_one "$side" seq-1m-fio-qd8-nohint buffered "$bf" fio_mb "$f" --rw=read --bs=1m --iodepth=8 --ioengine=io_uring --fadvise_hint=0
    # the same single pass with plain read(2): tells a gap of the io_uring path from one of the data path
    read_one "$side" seq-1m-fio-psync buffered "$bf" fio_mb "$f" --rw=read --bs=1m --ioengine=psync
    # without fio's fadvise (SEQUENTIAL, RANDOM): FUSE drops a hint at its own file,
    # so it reaches ext4 on the unpacked side only (docs/benchmarks.md, "fadvise hints and the first walk")
    read_one "$side" seq-1m-fio-psync-nohint buffered "$bf" fio_mb "$f" --rw=read --bs=1m --ioengine=psync \
      --fadvise_hint=0
    read_one "$side" rand-4k-fio-nohint buffered "$bf" fio_mb "$f" --rw=randread --bs=4k --iodepth=32 \
      --ioengine=io_uring --fadvise_hint=0
    read_one "$side" seq-1m-fio direct "$bf" fio_mb "$f" --rw=read --bs=1m --iodepth=8 --ioengine=io_uring \
      --direct=1 --runtime=3 --time_based
    read_one "$side" rand-4k-fio direct "$bf" fio_mb "$f" --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --runtime=3 --time_based
    read_one "$side" seq-1m-cstore direct "$bf" \
      sh -c '"$1" bench io --rw read --bs 1m --qd 8 --size 64m --runtime 3 --direct --json "$2" | jq .mb_per_s' _ "$cstore" "$f"
    # The lazy side's first walk registers a backing file per file (kept until
    # unmount): they pin the tree's inodes, so later walks read no inode from disk
    # there, while every unpacked walk does. Reported apart.
    read_one "$side" "tree-python$([ "$i" = 1 ] && echo -first)" buffered "$bt" \
      python3 benches/lazy.py treeread "$dir/opt/python"
  done
}

# The lazy side (not available yet): mount the image lazily, read every file
# once so that every span is local (a completed layer; the mount stays FUSE
# with passthrough, which is what is measured), then the same reads.
lazy_read_mount() { # lazy_read_mount ROOT DIR
  "$cstore" --root "$1" pull --lazy "$gz" >/dev/null
  "$cstore" --root "$1" mount --lazy "$gz" "$2"
  # lazy for real: the layers are the daemon's FUSE mounts (a layer without an
  # index would have been pulled whole and be measured as unpacked)
  local nf
  nf=$(findmnt -rn -t fuse.cstore -o TARGET | grep -c "^$(cd "$1" && pwd -P)/" || true)
  [ "$nf" -gt 0 ] || { echo "read: no FUSE layer under $1: the lazy side is not lazy" >&2; return 1; }
  echo "read: lazy side: $nf layers served by FUSE"
  python3 benches/lazy.py treeread "$2" >/dev/null
  # complete = the daemon verified every layer and took the lazy labels off
  # (the mount stays the daemon's FUSE mounts, files served by passthrough)
  local i
  for i in $(seq 1200); do
    "$cstore" --root "$1" snapshots --json | grep -q 'cstore.io/lazy"' || return 0
    sleep 0.5
  done
  echo "the lazy layers of $gz did not complete in 10 min" >&2
  return 1
}

if [ "$READ" = 1 ]; then
  : > "$work/read.txt"
  mkdir -p "$work/mnt-unpacked" "$work/mnt-lazy"
  "$cstore" --root "$work/read-unpacked" pull "$ref" >/dev/null
  "$cstore" --root "$work/read-unpacked" mount "$ref" "$work/mnt-unpacked"
  read_side unpacked "$work/mnt-unpacked" "$work/read-unpacked"
  "$cstore" --root "$work/read-unpacked" umount "$work/mnt-unpacked"
  if [ "$lazy" = 1 ]; then
    lazy_read_mount "$work/read-lazy" "$work/mnt-lazy"
    read_side lazy "$work/mnt-lazy" "$work/read-lazy"
    "$cstore" --root "$work/read-lazy" umount "$work/mnt-lazy"
    stop_lazy_daemon "$work/read-lazy"
  else
    echo "read throughput of a completed lazy layer: not available yet (\`cstore pull --help\` has no --lazy)"
  fi
  python3 benches/lazy.py reads "$work/read.txt"
fi
