//! Fuzz targets for everything in cstore that parses untrusted bytes. Each
//! target is a plain `fn(&[u8])` that panics when an invariant breaks, so
//! the same functions run under libFuzzer (`fuzz/`, cargo-fuzz) and in the
//! bounded randomized run of `tests/fuzz.rs` on the stable toolchain.
//!
//! The targets call the crates' public APIs only, so they stay thin when
//! the registry client and unpack move to crates of their own.

pub mod gen;
pub mod mutate;
pub mod sandbox;

use std::str::FromStr;

use arbitrary::{Arbitrary, Unstructured};
use cstore_registry::auth::{parse_challenge, Challenge, Credentials};
use cstore_registry::media;
use cstore_registry::{content_range_start, parse_digest, Reference};
use cstore_store::pull::{choose_manifest, image_plan};
use cstore_store::Platform;
use cstore_unpack::layer_compression;
use cstore_unpack::tar::{Kind, TarReader, MAX_META_BYTES};
use oci_spec::image::Digest;
use sha2::{Digest as _, Sha256};

pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Tar-shaped inputs: mutations keep 512-byte blocks in mind.
    pub tar: bool,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "tar",
        run: tar,
        tar: true,
    },
    Target {
        name: "layer",
        run: layer,
        tar: false,
    },
    Target {
        name: "layer_raw",
        run: layer_raw,
        tar: true,
    },
    Target {
        name: "manifest",
        run: manifest,
        tar: false,
    },
    Target {
        name: "config",
        run: config,
        tar: false,
    },
    Target {
        name: "reference",
        run: reference,
        tar: false,
    },
    Target {
        name: "www_authenticate",
        run: www_authenticate,
        tar: false,
    },
    Target {
        name: "content_range",
        run: content_range,
        tar: false,
    },
    Target {
        name: "index_parse",
        run: index_parse,
        tar: false,
    },
    Target {
        name: "estargz_toc",
        run: estargz_toc,
        tar: false,
    },
    Target {
        name: "estargz_blob",
        run: estargz_blob,
        tar: false,
    },
    Target {
        name: "soci_ztoc",
        run: soci_ztoc,
        tar: false,
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Write a header block's checksum field.
pub fn set_checksum(b: &mut [u8; 512]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&c| c as u32).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// The input with the checksum of every 512-byte block that carries a
/// ustar magic recomputed: headers sit on block boundaries, and without
/// this a mutated header would almost always fail its checksum and stop
/// the reader before anything interesting.
pub fn with_checksums(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    for chunk in v.chunks_exact_mut(512) {
        if &chunk[257..262] == b"ustar" {
            let b: &mut [u8; 512] = chunk.try_into().expect("a block");
            set_checksum(b);
        }
    }
    v
}

/// The tar reader alone: every entry read to its end. Checks that the data
/// read is exactly what the entry declares (sparse regions included), that
/// sparse maps are ordered and inside the file, and that no metadata record
/// got past its cap.
pub fn tar(data: &[u8]) {
    read_tar(&with_checksums(data));
}

fn read_tar(bytes: &[u8]) {
    let mut r = TarReader::new(bytes);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let e = match r.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) | Err(_) => return,
        };
        assert!(e.path.len() as u64 <= MAX_META_BYTES, "path past the cap");
        assert!(e.link.len() as u64 <= MAX_META_BYTES, "link past the cap");
        let want = match &e.sparse {
            Some(regions) => {
                assert_eq!(e.kind, Kind::File, "a sparse map on a non-file");
                let mut end = 0u64;
                let mut total = 0u64;
                for &(off, len) in regions {
                    assert!(off >= end, "sparse regions out of order: {regions:?}");
                    end = off.checked_add(len).expect("region end overflows");
                    assert!(end <= e.size, "region past the file's size");
                    total += len;
                }
                total
            }
            None if e.kind == Kind::File => e.size,
            None => 0,
        };
        let mut got = 0u64;
        loop {
            match r.read_data(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(_) => return,
            }
        }
        assert_eq!(got, want, "data read vs declared for {:?}", e.kind);
    }
}

/// A structured layer (see `gen`) extracted into a sandbox: nothing
/// outside the layer directory may change. The first choice says whether
/// small files go through io_uring batches (a gzip layer, as the device
/// policy would batch it) or one syscall at a time.
pub fn layer(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let batched = bool::arbitrary(&mut u).unwrap_or(false);
    if let Ok(l) = gen::Layer::arbitrary(&mut u) {
        let bytes = l.to_tar();
        read_tar(&bytes);
        if batched {
            sandbox::extract_checked_batched(&bytes);
        } else {
            sandbox::extract_checked(&bytes);
        }
    }
}

/// Raw bytes (checksums repaired) extracted into a sandbox.
pub fn layer_raw(data: &[u8]) {
    sandbox::extract_checked(&with_checksums(data));
}

fn fake_digest(data: &[u8]) -> Digest {
    parse_digest(&format!("sha256:{}", hex::encode(Sha256::digest(data)))).expect("a digest")
}

/// A manifest or index body from a registry: media type sniffing, the
/// manifest's plan (config and layers) and platform selection from an index
/// (for one of three platforms, chosen by the input's length: each call
/// parses the whole body again).
pub fn manifest(data: &[u8]) {
    let d = fake_digest(data);
    let _ = media::sniff_manifest_media_type(data);
    if let Ok(plan) = image_plan(data, &d, "fuzz/image") {
        assert!(media::is_config(&plan.config_type));
        assert_eq!(plan.blobs[0].0, plan.config_digest);
        assert!(plan.blobs.len() <= plan.layers.len() + 1);
        for l in &plan.layers {
            assert!(layer_compression(&l.media_type).is_some());
        }
    }
    let want = ["linux/amd64", "linux/arm64", "linux/arm/v7"][data.len() % 3];
    let want: Platform = want.parse().expect("a platform");
    if let Ok((desc, digest, platform)) = choose_manifest(data, &d, "fuzz/image", &want) {
        assert!(want.matches(&platform));
        assert_eq!(desc.digest().to_string(), digest.to_string());
    }
}

/// An image config: the diff_ids the snapshotter unpacks by, and the OCI
/// configuration `cstore run` reads.
pub fn config(data: &[u8]) {
    if let Ok(ids) = cstore_snapshotter::image::config_diff_ids(data, "sha256:fuzz", "fuzz") {
        for id in &ids {
            assert!(parse_digest(id).is_ok());
        }
        assert_eq!(cstore_snapshotter::image::chain_ids(&ids).len(), ids.len());
    }
    let _ = serde_json::from_slice::<oci_spec::image::ImageConfiguration>(data);
}

/// Image references, platforms and digests as given on the command line or
/// in a registry's answer. A reference that parses prints as one that
/// parses back to the same thing.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::from_str(s) {
        let printed = r.to_string();
        let again = Reference::from_str(&printed)
            .unwrap_or_else(|e| panic!("{s:?} prints as {printed:?}, which does not parse: {e}"));
        assert_eq!(again, r, "{s:?} -> {printed:?}");
        let _ = (
            r.is_loopback(),
            r.api_host(),
            r.manifest_reference(),
            r.name(),
        );
    }
    if let Ok(p) = Platform::from_str(s) {
        assert_eq!(Platform::from_str(&p.to_string()).ok(), Some(p));
    }
    let _ = parse_digest(s);
}

/// A registry's `WWW-Authenticate` header, and `--creds`.
pub fn www_authenticate(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(&s) {
        assert!(
            s.to_ascii_lowercase().contains("realm"),
            "{s:?} -> {realm:?}"
        );
    }
    if let Some(c) = Credentials::parse(&s) {
        assert!(!c.username.is_empty());
        let _ = c.basic_header();
    }
}

/// A `Content-Range` answer to a resumed download.
pub fn content_range(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Some(n) = content_range_start(&s) {
        assert!(s.starts_with("bytes "));
        let digits = s["bytes ".len()..].split('-').next().unwrap_or("");
        assert_eq!(digits.parse::<u64>().ok(), Some(n));
    }
}

/// A layer index as fetched from a registry (referrers): parsed and, if
/// accepted, every entry, span and chunk a reader can reach touched
/// (`cstore_index::fuzz`).
pub fn index_parse(data: &[u8]) {
    cstore_index::fuzz::index_parse(data);
}

/// An eStargz TOC (JSON), imported as an index.
pub fn estargz_toc(data: &[u8]) {
    cstore_index::fuzz::estargz_toc(data);
}

/// The end of an eStargz blob: its footer, and the TOC it points at.
pub fn estargz_blob(data: &[u8]) {
    cstore_index::fuzz::estargz_blob(data);
}

/// A SOCI zTOC, imported as an index.
pub fn soci_ztoc(data: &[u8]) {
    cstore_index::fuzz::soci_ztoc(data);
}
