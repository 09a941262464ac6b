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

# bench_esgz_image: the bench image converted to eStargz (`ctr-remote image
# convert --estargz --oci`, level 9 as upstream's default: minutes of CPU), as
# the OCI layout $FIXTURES/bench-estargz with tag `bench`, built once (stamp).
# The conversion runs in a private containerd fed from a throwaway registry;
# the result leaves through `ctr image export` (an OCI layout tar), so its
# manifest and blobs are kept byte for byte (checked: same manifest digest).
bench_esgz_image() {
  local stamp=$FIXTURES/stamps/bench-estargz layout=$FIXTURES/bench-estargz
  [ -f "$stamp" ] && [ -f "$layout/index.json" ] && return 0
  bench_image
  command -v ctr-remote >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stargz-snapshotter >/dev/null; }
  local tmp addr c want got
  tmp=$(mktemp -d /var/tmp/cstore-esgz.XXXXXX)
  (
    trap 'stop_containerd "$tmp/ctrd"; bash fixtures/registry.sh stop "$tmp/reg"; rm -rf "$tmp"' EXIT
    set -e
    addr=$(bash fixtures/registry.sh start "$tmp/reg")
    skopeo copy -q --dest-tls-verify=false "oci:$OCI:bench" "docker://$addr/bench:latest"
    start_containerd "$tmp/ctrd"
    c=(-a "$tmp/ctrd/containerd.sock" -n esgz)
    ctr "${c[@]}" image pull --plain-http "$addr/bench:latest" >/dev/null
    echo "bench_esgz_image: converting the bench image to eStargz (takes minutes)" >&2
    ctr-remote "${c[@]}" image convert --estargz --oci "$addr/bench:latest" bench-estargz:bench >/dev/null
    ctr "${c[@]}" image export --skip-manifest-json "$tmp/esgz.tar" bench-estargz:bench
    rm -rf "$layout.tmp" && mkdir -p "$layout.tmp"
    tar -xf "$tmp/esgz.tar" -C "$layout.tmp"
    # the export names its one manifest after containerd's image name: tag it `bench`
    jq -e '.manifests | length == 1' "$layout.tmp/index.json" >/dev/null
    jq -c '.manifests[0].annotations["org.opencontainers.image.ref.name"] = "bench"' \
      "$layout.tmp/index.json" > "$tmp/index.json"
    echo "index.json of the export: $(jq -c .manifests[0].annotations "$layout.tmp/index.json")" >&2
    mv "$tmp/index.json" "$layout.tmp/index.json"
    want=$(ctr "${c[@]}" image ls | awk '$1 == "bench-estargz:bench" {print $3}')
    got=$(skopeo inspect --raw "oci:$layout.tmp:bench" | sha256sum | cut -d' ' -f1)
    [ "sha256:$got" = "$want" ] || { echo "bench_esgz_image: exported manifest $got, containerd has $want" >&2; exit 1; }
    rm -rf "$layout" && mv "$layout.tmp" "$layout"
  ) || return 1
  mkdir -p "$(dirname "$stamp")" && date -u +%FT%TZ > "$stamp"
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

# wait_socket SOCK LOG: wait (10 s at most) for a daemon's unix socket; fails
# with the end of its LOG.
wait_socket() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "no socket $1 after 10 s: $(tail -5 "$2" 2>/dev/null)" >&2
  return 1
}

# umount_under DIR: unmount everything mounted at or below DIR, deepest first
# (lazily if busy), so that removing DIR never walks into a mount.
umount_under() {
  local d m
  [ -e "$1" ] || return 0
  d=$(cd "$1" && pwd -P)
  findmnt -rn -o TARGET | awk -v d="$d" '$0 == d || index($0, d "/") == 1' | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}

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
  # CSTORE_BIN=PATH: measure that binary (e.g. a copy of an older build) as is
  if [ -n "${CSTORE_BIN:-}" ]; then
    cstore=$CSTORE_BIN
  else
    cargo build --release --locked -q -p cstore
    cstore=$CARGO_TARGET_DIR/release/cstore
  fi
  work=$(mktemp -d /var/tmp/cstore-bench.XXXXXX)
  trap bench_cleanup EXIT
  bench_serve "$tag"
  local raw
  raw=$(skopeo inspect --raw --tls-verify=false "docker://$ref")
  echo "image $ref: $(jq '.layers | length' <<<"$raw") layers, $(( $(jq '[.layers[].size] | add' <<<"$raw") >> 20 )) MiB compressed"
}

# bench_serve TAG: a registry under $work/reg (stopped by the caller's cleanup)
# serving the fixtures tag TAG as $addr/TAG:latest; sets addr and ref.
bench_serve() {
  addr=$(bash fixtures/registry.sh start "$work/reg")
  skopeo copy -q --dest-tls-verify=false "oci:$OCI:$1" "docker://$addr/$1:latest"
  ref=$addr/$1:latest
}

bench_cleanup() {
  stop_containerd "$work/ctrd" || true
  bash fixtures/registry.sh stop "$work/reg" || true
  rm -rf "$work"
}
