#!/usr/bin/env python3
"""make-corpus.py - (re)write the committed seed corpus fuzz/corpus/<target>/.

  fuzz/make-corpus.py [OCI_LAYOUT]     default: /var/tmp/cstore-fixtures/oci

Seeds come from the test images (fixtures/images.sh, layered-images.sh: their
small layers uncompressed, manifests, indexes, configs), from archives GNU tar
writes (GNU, PAX, ustar and v7 formats, long names, all three sparse formats, xattrs,
devices, hardlinks), from fixtures/evil-tars.py (all but huge_pax, which
tests/fuzz.rs makes at run time with the other big seeds) and from hand-written
headers and references. Only small files are kept: the corpus stays a few
hundred KiB. Needs root (mknod) and GNU tar.
"""
import gzip, hashlib, io, json, os, shutil, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "corpus")
OCI = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/cstore-fixtures/oci"
MAX_TAR = 24 << 10
MAX_JSON = 24 << 10


def put(target, data, name=None):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = name or hashlib.sha256(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def blob(digest):
    with open(os.path.join(OCI, "blobs", digest.replace(":", "/")), "rb") as f:
        return f.read()


def decompress(media_type, data):
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    if media_type.endswith("zstd"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def from_oci():
    index = json.loads(open(os.path.join(OCI, "index.json")).read())
    seen = set()
    todo = [m["digest"] for m in index["manifests"]]
    layers = 0
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        doc = blob(d)
        if len(doc) > MAX_JSON:
            continue
        put("manifest", doc)
        m = json.loads(doc)
        todo += [x["digest"] for x in m.get("manifests", [])]
        if "config" in m:
            c = blob(m["config"]["digest"])
            if len(c) <= MAX_JSON:
                put("config", c)
        for l in m.get("layers", [])[:8]:
            if l["size"] > 64 << 10:
                continue
            t = decompress(l["mediaType"], blob(l["digest"]))
            if len(t) <= MAX_TAR and layers < 24:
                put("tar", trim(t))
                layers += 1


def trim(data):
    """Without the zero blocks writers pad the last record with: two remain."""
    data = data.rstrip(b"\0")
    return data + b"\0" * ((-len(data)) % 512) + b"\0" * 1024


def sh(cmd, cwd):
    subprocess.run(["bash", "-ec", cmd], cwd=cwd, check=True)


def gnu_tars():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        sh(
            """
            mkdir -p a/b sticky d/$(printf 'x%.0s' $(seq 110))
            echo hello > a/file.txt
            ln a/file.txt a/b/hard.txt
            ln -s ../file.txt a/b/rel-link
            ln -s /etc/passwd a/abs-link
            printf 'long' > d/$(printf 'x%.0s' $(seq 110))/$(printf 'y%.0s' $(seq 130)).txt
            chmod 1777 sticky; chmod 2750 a/b
            mkfifo a/fifo; mknod a/null c 1 3
            chown 1234:5678 a/file.txt
            setfattr -n user.cstore -v 'hello xattr' a/file.txt
            truncate -s 40000 sparse && printf 'mid' | dd of=sparse bs=1 seek=20000 conv=notrunc status=none
            printf 'end' >> sparse
            """,
            src,
        )
        variants = {
            "gnu": ["--format=gnu"],
            "gnu-sparse": ["--format=gnu", "--sparse"],
            "pax": ["--format=posix", "--xattrs"],
            "pax-sparse-0.0": ["--format=posix", "--sparse", "--sparse-version=0.0"],
            "pax-sparse-0.1": ["--format=posix", "--sparse", "--sparse-version=0.1"],
            "pax-sparse-1.0": ["--format=posix", "--sparse", "--sparse-version=1.0"],
            "ustar": ["--format=ustar"],
            "v7": ["--format=v7"],
        }
        for name, flags in variants.items():
            out = os.path.join(tmp, name + ".tar")
            if "sparse" in name:
                files = ["sparse"]
            elif name == "ustar":
                files = ["--exclude=./sparse", "--exclude=./d", "."]
            elif name == "v7":
                files = ["--exclude=a/fifo", "--exclude=a/null", "a", "sticky"]
            else:
                files = ["--exclude=./sparse", "--exclude=sparse", "."]
            r = subprocess.run(["tar", "-cf", out, *flags, "-C", src, *files], capture_output=True)
            if r.returncode not in (0, 1) or not os.path.exists(out):
                print("tar", name, "failed:", r.stderr.decode(), file=sys.stderr)
                continue
            put("tar", trim(open(out, "rb").read()), name)


def evil():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(REPO, "fixtures/evil-tars.py"), tmp], check=True)
        for f in sorted(os.listdir(tmp)):
            data = open(os.path.join(tmp, f), "rb").read()
            if len(data) <= 64 << 10:
                put("tar", trim(data), "evil-" + f[:-4])


def structured():
    # Any bytes are a layer for `arbitrary`; a few lengths of fixed noise.
    h = hashlib.sha256(b"cstore-fuzz")
    for n in (16, 64, 256, 1024, 4096):
        data = b""
        while len(data) < n:
            h = hashlib.sha256(h.digest())
            data += h.digest()
        put("layer", data[:n], f"noise-{n}")


def texts():
    d = "sha256:" + "a" * 64
    refs = ["alpine", "alpine:3.20", "user/app", "index.docker.io/library/alpine",
            "127.0.0.1:5000/busybox", "localhost/a/b:v1", f"localhost:5000/busybox@{d}",
            f"ghcr.io/o/r:t@{d}", "[::1]:5000/x/y:z", "Registry.Example/a", "linux/arm64/v8",
            "linux/amd64", d]
    for i, r in enumerate(refs):
        put("reference", r.encode(), f"ref-{i}")
    auths = [
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"',
        'Basic realm="basic-realm"',
        'bearer realm=http://127.0.0.1:5001/token, service=reg',
        'Bearer realm="a\\"b",scope="x"',
        "Negotiate",
    ]
    for i, a in enumerate(auths):
        put("www_authenticate", a.encode(), f"auth-{i}")
    put("www_authenticate", b"user:pa:ss", "creds")
    for i, c in enumerate(["bytes 0-99/100", "bytes 300000-1084640/1084641", "bytes */100",
                           "bytes 18446744073709551615-0/1"]):
        put("content_range", c.encode(), f"range-{i}")
    docker_list = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
             "digest": d, "size": 527, "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
             "digest": d, "size": 527, "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }
    put("manifest", json.dumps(docker_list).encode(), "docker-list")
    docker_manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1, "digest": d},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2, "digest": d}],
    }
    put("manifest", json.dumps(docker_manifest).encode(), "docker-manifest")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    # layer_raw extracts what tar reads: one corpus for both.
    os.symlink("tar", os.path.join(OUT, "layer_raw"))
    from_oci()
    gnu_tars()
    evil()
    structured()
    texts()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"corpus: {sum(len(fs) for _, _, fs in os.walk(OUT))} files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
