//! Do two entry tables describe the same tree? Completion rebuilds the
//! table from the verified tar and compares it with the one that was served
//! (docs/lazy.md, "Trust"); tests compare imports with built indexes.

use std::fmt;

use crate::format::{Index, Kind};

/// What to compare beyond the tree itself.
#[derive(Clone, Copy, Debug)]
pub struct CompareOptions {
    /// Data offsets of files (false when one side addresses payloads, as an
    /// eStargz import does).
    pub data_offsets: bool,
    /// Sub-second mtimes (false against eStargz TOCs, which keep seconds).
    pub mtime_nanos: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            data_offsets: true,
            mtime_nanos: true,
        }
    }
}

/// The first difference found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub path: String,
    pub what: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.path, self.what)
    }
}

/// Compare the trees of `a` and `b` entry by entry, by path.
pub fn compare<A: AsRef<[u8]>, B: AsRef<[u8]>>(
    a: &Index<A>,
    b: &Index<B>,
    opts: CompareOptions,
) -> Result<(), Mismatch> {
    let n = a.entry_count() as usize;
    let mut map = vec![u32::MAX; n];
    map[0] = 0;
    let miss = |i: u32, what: String| Mismatch {
        path: String::from_utf8_lossy(&a.path(i)).into_owned(),
        what,
    };
    for i in 0..n as u32 {
        let j = if i == 0 {
            0
        } else {
            let p = map[a.parent(i) as usize];
            b.lookup(p, a.name(i))
                .ok_or_else(|| miss(i, "missing from the other tree".into()))?
        };
        map[i as usize] = j;
        let (x, y) = (a.entry(i), b.entry(j));
        let diff = |what: &str, l: String, r: String| Err(miss(i, format!("{what}: {l} vs {r}")));
        if x.kind != y.kind {
            return diff("kind", format!("{:?}", x.kind), format!("{:?}", y.kind));
        }
        if x.kind == Kind::Hardlink {
            let (t, u) = (x.hardlink_target().unwrap(), y.hardlink_target().unwrap());
            if map[t as usize] != u {
                let (l, r) = (a.path(t), b.path(u));
                return diff(
                    "hardlink target",
                    String::from_utf8_lossy(&l).into(),
                    String::from_utf8_lossy(&r).into(),
                );
            }
            continue;
        }
        if x.mode != y.mode {
            return diff("mode", format!("{:o}", x.mode), format!("{:o}", y.mode));
        }
        if (x.uid, x.gid) != (y.uid, y.gid) {
            return diff(
                "owner",
                format!("{}:{}", x.uid, x.gid),
                format!("{}:{}", y.uid, y.gid),
            );
        }
        let (mx, my) = if opts.mtime_nanos {
            (x.mtime, y.mtime)
        } else {
            ((x.mtime.0, 0), (y.mtime.0, 0))
        };
        if mx != my {
            return diff("mtime", format!("{mx:?}"), format!("{my:?}"));
        }
        if x.size != y.size {
            return diff("size", x.size.to_string(), y.size.to_string());
        }
        if x.flags != y.flags {
            return diff(
                "flags",
                format!("{:#x}", x.flags),
                format!("{:#x}", y.flags),
            );
        }
        if x.rdev() != y.rdev() {
            return diff(
                "device",
                format!("{:?}", x.rdev()),
                format!("{:?}", y.rdev()),
            );
        }
        if a.link_target(i) != b.link_target(j) {
            return diff(
                "symlink target",
                format!("{:?}", a.link_target(i)),
                format!("{:?}", b.link_target(j)),
            );
        }
        if !a.xattrs(i).eq(b.xattrs(j)) {
            return diff(
                "xattrs",
                format!("{:?}", a.xattrs(i).count()),
                format!("{:?}", b.xattrs(j).count()),
            );
        }
        let (sx, sy) = (
            a.sparse_map(i).map(|m| m.collect::<Vec<_>>()),
            b.sparse_map(j).map(|m| m.collect::<Vec<_>>()),
        );
        if sx != sy {
            return diff("sparse map", format!("{sx:?}"), format!("{sy:?}"));
        }
        if opts.data_offsets && x.data_offset() != y.data_offset() {
            return diff(
                "data offset",
                format!("{:?}", x.data_offset()),
                format!("{:?}", y.data_offset()),
            );
        }
    }
    if a.entry_count() != b.entry_count() {
        return Err(Mismatch {
            path: String::new(),
            what: format!("{} entries vs {}", a.entry_count(), b.entry_count()),
        });
    }
    Ok(())
}
