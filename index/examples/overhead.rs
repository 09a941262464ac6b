//! What indexing costs in the unpack pass, on real layers (not a test: a
//! measurement for the docs and reports).
//!
//!     cargo run --release -p cstore-index --example overhead -- [--rounds N] LAYER.gz...
//!
//! Per layer, the minimum thread CPU time over N interleaved rounds of:
//! - inflate:     flate2's MultiGzDecoder to a sink (today's unpack decompressor);
//! - checkpoints: IndexingReader to a sink (Z_BLOCK, checkpoints, raw windows,
//!   a sha256 per span);
//! - walk:        inflate + the project's tar reader;
//! - index:       checkpoints + the tar reader + TreeBuilder + encoding: the
//!   whole index, as unpack would build it;
//!
//! then the index's sizes, `Index::parse` time (validation and the name
//! lookup tables), and the windows compacted for push.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;
use std::time::Duration;

use cstore_index::windows::compact_windows;
use cstore_index::{Compression, Index, IndexingReader, Policy, TarEntry, TarKind, TreeBuilder};
use cstore_unpack::tar::{Kind, TarReader};

fn cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Counting<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        Ok(k)
    }
}

fn kind(k: Kind) -> TarKind {
    match k {
        Kind::File => TarKind::File,
        Kind::Dir => TarKind::Dir,
        Kind::Symlink => TarKind::Symlink,
        Kind::Hardlink => TarKind::Hardlink,
        Kind::Char => TarKind::Char,
        Kind::Block => TarKind::Block,
        Kind::Fifo => TarKind::Fifo,
    }
}

/// Walk a tar stream with the project's reader; with `tree`, feed the
/// entries (and their data offsets) to a TreeBuilder.
fn walk<R: Read>(r: R, tree: Option<&mut TreeBuilder>) -> R {
    let n = Rc::new(Cell::new(0));
    let mut tr = TarReader::new(Counting {
        inner: r,
        n: n.clone(),
    });
    let mut tree = tree;
    while let Some(e) = tr.next_entry().expect("tar") {
        if let Some(t) = tree.as_deref_mut() {
            let mut te = TarEntry::new(&e.path, kind(e.kind));
            te.mode = e.mode;
            te.uid = e.uid;
            te.gid = e.gid;
            te.mtime = e.mtime;
            te.size = e.size;
            te.data_offset = n.get();
            te.link = &e.link;
            te.dev = (e.dev_major, e.dev_minor);
            te.xattrs = &e.xattrs;
            te.sparse = e.sparse.as_deref();
            t.add(&te).expect("entry");
        }
    }
    let mut rest = tr.into_inner();
    io::copy(&mut rest, &mut io::sink()).unwrap();
    rest.inner
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 5;
    if args.first().map(String::as_str) == Some("--rounds") {
        rounds = args[1].parse().unwrap();
        args.drain(..2);
    }
    let policy = Policy::default();
    for path in args {
        let blob = std::fs::read(&path).unwrap();
        let mut best = [Duration::MAX; 4];
        let mut built = None;
        for _ in 0..rounds {
            let t = cpu();
            io::copy(
                &mut flate2::bufread::MultiGzDecoder::new(&blob[..]),
                &mut io::sink(),
            )
            .unwrap();
            best[0] = best[0].min(cpu() - t);

            let t = cpu();
            let mut ir = IndexingReader::new(&blob[..], Compression::Gzip, policy, Vec::new());
            io::copy(&mut ir, &mut io::sink()).unwrap();
            ir.finish().unwrap();
            best[1] = best[1].min(cpu() - t);

            let t = cpu();
            walk(flate2::bufread::MultiGzDecoder::new(&blob[..]), None);
            best[2] = best[2].min(cpu() - t);

            let t = cpu();
            let mut tree = TreeBuilder::new(Default::default());
            let ir = walk(
                IndexingReader::new(&blob[..], Compression::Gzip, policy, Vec::new()),
                Some(&mut tree),
            );
            let (cp, windows) = ir.finish().unwrap();
            let index = cp
                .into_builder(tree.finish().unwrap(), [0; 32], [0; 32])
                .encode()
                .unwrap();
            best[3] = best[3].min(cpu() - t);
            built = Some((index, windows));
        }
        let (index, windows) = built.unwrap();
        let mut parse = Duration::MAX;
        for _ in 0..rounds {
            let t = cpu();
            let idx = Index::parse(&index[..]).unwrap();
            parse = parse.min(cpu() - t);
            std::hint::black_box(idx.entry_count());
        }
        let idx = Index::parse(&index[..]).unwrap();
        let t = cpu();
        let c = compact_windows(
            &idx,
            &windows,
            |_, r| Ok(blob[r.start as usize..r.end as usize].to_vec()),
            3,
        )
        .unwrap();
        let compact = cpu() - t;
        let zidx = zstd::bulk::compress(&index, 3).unwrap();
        let pct = |a: Duration, b: Duration| 100.0 * (a.as_secs_f64() / b.as_secs_f64() - 1.0);
        let name = path.rsplit('/').next().unwrap();
        println!(
            "{}: {:.1} MB gzip, {} entries, {} spans",
            &name[..12.min(name.len())],
            blob.len() as f64 / 1e6,
            idx.entry_count(),
            idx.span_count()
        );
        println!(
            "  inflate {:.3} s; checkpoints {:.3} s ({:+.1}%); walk {:.3} s; index {:.3} s ({:+.1}% over walk)",
            best[0].as_secs_f64(),
            best[1].as_secs_f64(),
            pct(best[1], best[0]),
            best[2].as_secs_f64(),
            best[3].as_secs_f64(),
            pct(best[3], best[2])
        );
        println!(
            "  index {:.2} MB ({:.2} MB zstd), parse {:.2} ms; windows {:.2} MB raw, {:.2} MB compacted ({} dropped) in {:.2} s",
            index.len() as f64 / 1e6,
            zidx.len() as f64 / 1e6,
            parse.as_secs_f64() * 1e3,
            windows.len() as f64 / 1e6,
            c.after as f64 / 1e6,
            c.dropped,
            compact.as_secs_f64()
        );
    }
}
