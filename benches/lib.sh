# Shared helpers for the benchmarks (sourced, not run).
# shellcheck shell=bash

FIXTURES=${CSTORE_FIXTURES:-/var/tmp/cstore-fixtures}
OCI=$FIXTURES/oci

# bench_image: tag `bench` in the fixtures layout, built once (cached with a
# stamp): 3 gzip layers — a debootstrap'd Debian root (tag debian), a CPython
# installation tree (tens of thousands of small files), and 64 MiB of random
# bytes. Well over 500 MB unpacked.
bench_image() {
  local stamp=$FIXTURES/stamps/bench
  [ -f "$stamp" ] && return 0
  bash fixtures/images.sh --debian >/dev/null
  local py
  py=$(python3 -c 'import sys; print(sys.base_prefix)')
  [ -d "$py/lib" ] || { echo "bench_image: no CPython tree at $py" >&2; return 1; }
  local tmp
  tmp=$(mktemp -d /var/tmp/cstore-bench-img.XXXXXX)
  head -c $((64 << 20)) /dev/urandom > "$tmp/random.bin"
  umoci tag --image "$OCI:debian" bench
  umoci insert --image "$OCI:bench" "$py" /opt/python
  umoci insert --image "$OCI:bench" "$tmp/random.bin" /data/random.bin
  umoci gc --layout "$OCI"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
}

# start_containerd DIR [TOML]: a private containerd (own root, state, socket;
# CRI off), with TOML appended to its config (e.g. a proxy plugin).
start_containerd() {
  local dir=$1 extra=${2:-}
  mkdir -p "$dir"
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "warn"
$extra
TOML
  containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
  echo $! > "$dir/pid"
  for _ in $(seq 100); do [ -S "$dir/containerd.sock" ] && return 0; sleep 0.1; done
  echo "containerd did not start: $(tail -5 "$dir/containerd.log")" >&2
  return 1
}

stop_containerd() {
  local dir=$1
  [ -f "$dir/pid" ] || return 0
  kill "$(cat "$dir/pid")" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$(cat "$dir/pid")" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
  rm -f "$dir/pid"
}

# t NAME CMD...: run CMD (its output dropped) under /usr/bin/time; $work/NAME
# gets "wall-seconds peak-RSS-KiB user-seconds sys-seconds" (user and sys
# include the io-wq workers, which are the process's threads).
t() {
  local out=$work/$1; shift
  /usr/bin/time -f '%e %M %U %S' -o "$out" "$@" >/dev/null 2>"$out.err" || { cat "$out.err" >&2; return 1; }
}

# col NAME N: the median over the RUNS rounds ($work/NAME.1 …) of column N of t's line.
col() { for i in $(seq "$RUNS"); do awk -v c="$2" '{print $c}' "$work/$1.$i"; done | median; }

# median of numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# bench_setup [TAG]: everything the benchmarks with a registry share. Installs
# the peers, builds cstore (release) and the fixtures image TAG (default: the
# bench image), serves it from a registry on 127.0.0.1, and sets: cstore, work
# (removed on exit by bench_cleanup, with the registry and any containerd under
# it stopped), addr, ref.
bench_setup() {
  local tag=${1:-bench}
  bash fixtures/deps.sh --bench
  if [ "$tag" = bench ]; then bench_image; else bash fixtures/images.sh >/dev/null; fi
  cargo build --release --locked -q -p cstore
  cstore=$CARGO_TARGET_DIR/release/cstore
  work=$(mktemp -d /var/tmp/cstore-bench.XXXXXX)
  trap bench_cleanup EXIT
  addr=$(bash fixtures/registry.sh start "$work/reg")
  skopeo copy -q --dest-tls-verify=false "oci:$OCI:$tag" "docker://$addr/$tag:latest"
  ref=$addr/$tag:latest
  local raw
  raw=$(skopeo inspect --raw --tls-verify=false "docker://$ref")
  echo "image $ref: $(jq '.layers | length' <<<"$raw") layers, $(( $(jq '[.layers[].size] | add' <<<"$raw") >> 20 )) MiB compressed"
}

bench_cleanup() {
  stop_containerd "$work/ctrd" || true
  bash fixtures/registry.sh stop "$work/reg" || true
  rm -rf "$work"
}
