//! Mutations for the bounded run on stable (libFuzzer brings its own): the
//! usual byte-level ones (flips, interesting values, inserts, deletes,
//! copies, splices from another seed, dictionary words), plus, for tar
//! inputs, edits of a header field in place (numbers in octal and base-256,
//! typeflags, magics, names) so that mutated archives stay archives.

/// A small deterministic generator (xorshift64*): a failing run prints
/// its seed, and the same seed replays it.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Words worth inserting, for every target: tar's keywords and magics,
/// JSON shapes of manifests, reference and header syntax.
pub const DICTIONARY: &[&[u8]] = &[
    b"ustar\0",
    b"ustar  \0",
    b"././@LongLink",
    b"path=",
    b"linkpath=",
    b"size=",
    b"uid=",
    b"gid=",
    b"mtime=",
    b"SCHILY.xattr.",
    b"SCHILY.xattr.trusted.overlay.opaque=",
    b"SCHILY.xattr.security.capability=",
    b"SCHILY.devmajor=",
    b"GNU.sparse.major=1",
    b"GNU.sparse.minor=0",
    b"GNU.sparse.map=",
    b"GNU.sparse.size=",
    b"GNU.sparse.realsize=",
    b"GNU.sparse.name=",
    b"18446744073709551615",
    b"9223372036854775807",
    b"-1",
    b"4294967295",
    b".wh.",
    b".wh..wh..opq",
    b"../",
    b"/etc/passwd",
    b"\"mediaType\":",
    b"\"schemaVersion\":2",
    b"\"manifests\":[",
    b"\"layers\":[",
    b"\"config\":{",
    b"\"digest\":\"sha256:",
    b"\"size\":",
    b"\"platform\":{\"os\":\"linux\",\"architecture\":\"amd64\"}",
    b"\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[",
    b"application/vnd.oci.image.manifest.v1+json",
    b"application/vnd.oci.image.index.v1+json",
    b"application/vnd.oci.image.layer.v1.tar+gzip",
    b"application/vnd.oci.image.config.v1+json",
    b"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    b"Bearer realm=\"",
    b"Basic ",
    b"service=",
    b"scope=\"repository:a:pull\"",
    b"bytes ",
    b"localhost:5000/",
    b"docker.io/library/",
    b"index.docker.io/",
    b"@sha256:",
    b":latest",
    b"\\\"",
    b"\xff\xff\xff\xff",
    b"\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01",
];

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'0', b'7', b'8', b' ', b'\n', b'/', b'.',
];

/// Header fields: (offset, length).
const FIELDS: &[(usize, usize)] = &[
    (0, 100),   // name
    (100, 8),   // mode
    (108, 8),   // uid
    (116, 8),   // gid
    (124, 12),  // size
    (136, 12),  // mtime
    (156, 1),   // typeflag
    (157, 100), // linkname
    (257, 8),   // magic + version
    (329, 8),   // devmajor
    (337, 8),   // devminor
    (345, 155), // prefix
    (386, 96),  // old GNU sparse map
    (482, 1),   // isextended
    (483, 12),  // realsize
];

fn numbers(r: &mut Rng) -> u64 {
    match r.below(6) {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << r.below(64),
        3 => (1 << r.below(64)) - 1,
        4 => r.below(4096) as u64,
        _ => r.next_u64(),
    }
}

fn tar_field(data: &mut [u8], r: &mut Rng) {
    let blocks = data.len() / 512;
    if blocks == 0 {
        return;
    }
    let b = r.below(blocks) * 512;
    let (off, len) = FIELDS[r.below(FIELDS.len())];
    let f = &mut data[b + off..b + off + len];
    match r.below(6) {
        0 if len > 1 => {
            // Octal, maybe past the field.
            let s = format!("{:o}", numbers(r));
            let n = s.len().min(len);
            f[..n].copy_from_slice(&s.as_bytes()[..n]);
            if n < len {
                f[n] = 0;
            }
        }
        1 if len > 1 => {
            // Base-256 (GNU), positive or negative.
            f.fill(0);
            f[0] = if r.chance(4) { 0xff } else { 0x80 };
            let v = numbers(r).to_be_bytes();
            let n = v.len().min(len - 1);
            f[len - n..].copy_from_slice(&v[v.len() - n..]);
        }
        2 => {
            f[0] = *b"0123456789ASgxLKDMNV\0".get(r.below(21)).unwrap_or(&b'x');
        }
        3 => {
            let w = DICTIONARY[r.below(DICTIONARY.len())];
            let n = w.len().min(len);
            f[..n].copy_from_slice(&w[..n]);
        }
        4 => f.fill(if r.chance(2) { 0 } else { b' ' }),
        _ => {
            let i = r.below(len);
            f[i] = INTERESTING[r.below(INTERESTING.len())];
        }
    }
}

/// One to eight mutations of `data`; `other` is another seed to splice
/// from; `max` caps the result's length.
pub fn mutate(data: &mut Vec<u8>, other: &[u8], tar: bool, max: usize, r: &mut Rng) {
    for _ in 0..1 + r.below(8) {
        let len = data.len();
        match r.below(if tar { 11 } else { 9 }) {
            0 if len > 0 => {
                let i = r.below(len);
                data[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                data[i] = INTERESTING[r.below(INTERESTING.len())];
            }
            2 => {
                let i = r.below(len + 1);
                let n = 1 + r.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(if tar { 1024 } else { 64 }));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                // Copy a range elsewhere (repeats a header, a record...).
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(1024));
                let chunk = data[i..i + n].to_vec();
                let at = r.below(len + 1);
                data.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let i = r.below(other.len());
                let n = 1 + r.below((other.len() - i).min(4096));
                let at = r.below(len + 1);
                let cut = r.below(len - at + 1);
                data.splice(at..at + cut, other[i..i + n].iter().copied());
            }
            6 => {
                let w = DICTIONARY[r.below(DICTIONARY.len())];
                let i = r.below(len + 1);
                if r.chance(2) && i + w.len() <= len {
                    data[i..i + w.len()].copy_from_slice(w);
                } else {
                    data.splice(i..i, w.iter().copied());
                }
            }
            7 if len > 0 => {
                // A decimal number somewhere (PAX lengths, JSON sizes).
                let s = numbers(r).to_string();
                let i = r.below(len);
                let end = (i + s.len()).min(len);
                data.splice(i..end, s.bytes());
            }
            8 if len > 0 => data.truncate(r.below(len)),
            9 | 10 => tar_field(data, r),
            _ => {}
        }
    }
    data.truncate(max);
}
