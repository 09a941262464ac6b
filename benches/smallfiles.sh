#!/usr/bin/env bash
# smallfiles.sh - unpack of many small files: batched io_uring vs one syscall
# at a time. Builds (once, cached) tags smallfiles-tar and smallfiles-gz: one
# layer of ~100k files of 0-8 KiB in ~3000 directories (uncompressed / gzip),
# serves them from a registry on 127.0.0.1, pulls each into a cstore store
# with --no-unpack, then times `cstore unpack` with CSTORE_IO=sync and
# CSTORE_IO=uring (a fresh copy of the store each run, cold page cache), and
# umoci unpack of the same layout as the peer. Checks that both modes build
# the same tree. Prints medians of RUNS runs and the ratios.
#
# FS picks the filesystem the stores and umoci's bundle live on: `root` (the
# directory under /var/tmp as it is), or `ext4` / `xfs`, made fresh (mkfs
# defaults, so ext4 has its journal) on a loop device over a file in /var/tmp.
# This machine's root is an ext4 *without* a journal, where every inode
# allocation also scans for recently deleted inodes; a store usually lives on a
# journaled ext4 or on xfs.
#
#   sudo benches/smallfiles.sh        (RUNS=3, FILES=100000, FS=root by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
FILES=${FILES:-100000}
FS=${FS:-root}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cstore-target}

# smallfiles_image: tags smallfiles-tar and smallfiles-gz in the fixtures
# layout. umoci only writes gzip layers, so the layout entries are written here.
smallfiles_image() {
  local stamp=$FIXTURES/stamps/smallfiles-$FILES
  [ -f "$stamp" ] && return 0
  bash fixtures/images.sh >/dev/null   # the layout exists
  local tmp
  tmp=$(mktemp -d /var/tmp/cstore-bench-small.XXXXXX)
  python3 - "$tmp/tree" "$FILES" <<'PY'
import base64, os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
dirs = []
for a in range(max(1, n // 3300)):
    for b in range(100):
        d = os.path.join(root, f"d{a:02}", f"s{b:03}")
        os.makedirs(d)
        dirs.append(d)
for i in range(n):
    d = dirs[i % len(dirs)]
    size = rng.randint(0, 8192)
    # base64 of random bytes: text-like, gzip shrinks it by about a quarter
    data = base64.b64encode(rng.randbytes(size * 3 // 4 + 3))[:size]
    p = os.path.join(d, f"f{i:06}.txt")
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, 0o755 if i % 10 == 0 else 0o644)
PY
  tar -C "$tmp/tree" --sort=name --numeric-owner --owner=0 --group=0 \
    --mtime=2024-01-01 -cf "$tmp/layer.tar" .
  gzip -1 -c "$tmp/layer.tar" > "$tmp/layer.tar.gz"
  local diff size
  diff=$(sha256sum "$tmp/layer.tar" | cut -d' ' -f1)
  blob() {  # blob FILE -> digest (hex), stored in the layout
    local h; h=$(sha256sum "$1" | cut -d' ' -f1)
    cp "$1" "$OCI/blobs/sha256/$h"; echo "$h"
  }
  printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff" > "$tmp/config.json"
  local cfg; cfg=$(blob "$tmp/config.json")
  local tag file mt
  for tag in tar gz; do
    if [ $tag = tar ]; then file=$tmp/layer.tar mt=application/vnd.oci.image.layer.v1.tar
    else file=$tmp/layer.tar.gz mt=application/vnd.oci.image.layer.v1.tar+gzip; fi
    local lh; lh=$(blob "$file"); size=$(stat -c %s "$file")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"%s","digest":"sha256:%s","size":%s}]}' \
      "$cfg" "$(stat -c %s "$tmp/config.json")" "$mt" "$lh" "$size" > "$tmp/manifest.json"
    local mh; mh=$(blob "$tmp/manifest.json")
    flock 9
    jq --arg d "sha256:$mh" --argjson s "$(stat -c %s "$tmp/manifest.json")" --arg t "smallfiles-$tag" \
      '.manifests |= ([.[] | select(.annotations["org.opencontainers.image.ref.name"] != $t)]
        + [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $d, size: $s,
            annotations: {"org.opencontainers.image.ref.name": $t}}])' \
      "$OCI/index.json" > "$tmp/index.json"
    mv "$tmp/index.json" "$OCI/index.json"
  done 9>"$FIXTURES/.lock"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
}

# push_blobs TAG REPO: push a fixtures-layout image with its blobs as they are
# (skopeo would gzip the uncompressed layer on the way to a registry).
push_blobs() {
  local m name=$2 d loc
  m=$(jq -r --arg t "$1" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$OCI/index.json")
  for d in $(jq -r '.config.digest, .layers[].digest' "$OCI/blobs/sha256/${m#sha256:}"); do
    loc=$(curl -sf -X POST -D - -o /dev/null "http://$addr/v2/$name/blobs/uploads/" |
      tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
    case $loc in http*) ;; *) loc=http://$addr$loc ;; esac
    curl -sf -X PUT -H 'Content-Type: application/octet-stream' \
      --data-binary "@$OCI/blobs/sha256/${d#sha256:}" "$loc&digest=$d" >/dev/null
  done
  curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$OCI/blobs/sha256/${m#sha256:}" "http://$addr/v2/$name/manifests/latest" >/dev/null
}

bash fixtures/deps.sh --bench
smallfiles_image
cargo build --release --locked -q -p cstore
cstore=$CARGO_TARGET_DIR/release/cstore
work=$(mktemp -d /var/tmp/cstore-bench.XXXXXX)
loopdev=
cleanup() {
  bash fixtures/registry.sh stop "$work/reg" || true
  if [ -n "$loopdev" ]; then umount "$work/fs" 2>/dev/null || true; losetup -d "$loopdev" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
addr=$(bash fixtures/registry.sh start "$work/reg")
# dst: where the stores and umoci's bundle go.
case $FS in
  root) dst=$work ;;
  ext4|xfs)
    truncate -s 8G "$work/fs.img"
    loopdev=$(losetup --find --show "$work/fs.img")
    if [ "$FS" = ext4 ]; then mkfs.ext4 -q "$loopdev"; else mkfs.xfs -q "$loopdev"; fi
    mkdir "$work/fs" && mount "$loopdev" "$work/fs"
    dst=$work/fs ;;
  *) echo "FS=$FS: root, ext4 or xfs" >&2; exit 2 ;;
esac
for v in tar gz; do
  push_blobs "smallfiles-$v" "small$v"
  "$cstore" --root "$dst/pulled-$v" pull --no-unpack "$addr/small$v:latest" >/dev/null
done

# fresh: what the previous run left is removed, and the inodes it freed have
# aged past ext4's "recently deleted" window (which it scans on every inode
# allocation on a journal-less fs) before the cache is dropped.
fresh() { rm -rf "$dst/cu" "$dst/bundle"; sync; sleep 6; drop_caches; }

for i in $(seq "$RUNS"); do
  for v in tar gz; do
    for mode in sync uring; do
      fresh; cp -a "$dst/pulled-$v" "$dst/cu"; sync; drop_caches
      t "$mode-$v.$i" env CSTORE_IO=$mode "$cstore" --root "$dst/cu" unpack "$addr/small$v:latest"
      if [ "$i" = 1 ]; then
        python3 fixtures/treesnap.py "$dst"/cu/snapshots/[0-9]*/fs > "$work/tree-$mode-$v"
      fi
    done
    fresh
    t "umoci-$v.$i" umoci unpack --image "$OCI:smallfiles-$v" "$dst/bundle"
    t "umoci-sync-$v.$i" sync
  done
done
fresh

for v in tar gz; do
  if ! cmp -s "$work/tree-sync-$v" "$work/tree-uring-$v"; then
    diff "$work/tree-sync-$v" "$work/tree-uring-$v" | head -20
    echo "smallfiles-$v: the trees of CSTORE_IO=sync and CSTORE_IO=uring differ" >&2
    exit 1
  fi
done

runs() { for i in $(seq "$RUNS"); do cut -d' ' -f1 "$work/$1.$i"; done | tr '\n' ' '; }
files=$(grep -c '"type": *"file"' "$work/tree-sync-tar" || true)
echo
echo "unpack of $files small files (0-8 KiB, one layer) on FS=$FS, median of $RUNS runs, cold cache;"
echo "trees of both modes equal. Seconds: wall (user + sys of the process and its io-wq workers)"
for v in tar gz; do
  printf '  %-30s %7.2f  (%5.2f + %5.2f)   runs: %s\n' "cstore CSTORE_IO=sync  ($v)" \
    "$(col sync-$v 1)" "$(col sync-$v 3)" "$(col sync-$v 4)" "$(runs sync-$v)"
  printf '  %-30s %7.2f  (%5.2f + %5.2f)   runs: %s\n' "cstore CSTORE_IO=uring ($v)" \
    "$(col uring-$v 1)" "$(col uring-$v 3)" "$(col uring-$v 4)" "$(runs uring-$v)"
  printf '  %-30s %7.2f  (%5.2f + %5.2f)  + sync afterwards %.2f\n' "umoci unpack ($v)" \
    "$(col umoci-$v 1)" "$(col umoci-$v 3)" "$(col umoci-$v 4)" "$(col umoci-sync-$v 1)"
  printf '  ratio uring / sync  %.2f    sync / umoci  %.2f    uring / umoci  %.2f\n' \
    "$(echo "$(col uring-$v 1)/$(col sync-$v 1)" | bc -l)" \
    "$(echo "$(col sync-$v 1)/$(col umoci-$v 1)" | bc -l)" \
    "$(echo "$(col uring-$v 1)/$(col umoci-$v 1)" | bc -l)"
done
echo "(cstore makes the layer durable with syncfs before committing it; umoci doesn't)"
