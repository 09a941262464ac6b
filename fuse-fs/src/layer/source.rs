//! Where a lazy layer's compressed bytes come from: [`SpanSource`]. The registry's
//! ranged blob reads implement it for real pulls; [`FileSource`] reads a local blob
//! (tests, `cstore-fuse-testd serve-layer`).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Fetches byte ranges of a layer's compressed blob and of its windows blob (the
/// index's inflate windows, kept apart from it). Called from the fetcher threads,
/// one call per coalesced run of spans; what comes back is checked against the
/// index's digests before anything is used, so a source need not be trusted.
pub trait SpanSource: Send + Sync + 'static {
    /// Bytes `range` of the compressed layer blob, exactly that many.
    fn fetch(&self, range: Range<u64>) -> io::Result<Vec<u8>>;
    /// Bytes `range` of the windows blob, exactly that many.
    fn fetch_windows(&self, range: Range<u64>) -> io::Result<Vec<u8>>;
}

/// A layer blob and windows blob in local files.
#[derive(Debug)]
pub struct FileSource {
    blob: File,
    windows: Option<File>,
}

impl FileSource {
    /// `windows` may be None for a layer whose spans need no window (an
    /// uncompressed or zstd layer).
    pub fn open(blob: &Path, windows: Option<&Path>) -> io::Result<FileSource> {
        Ok(FileSource {
            blob: File::open(blob)?,
            windows: windows.map(File::open).transpose()?,
        })
    }
}

fn read_range(f: &File, range: Range<u64>) -> io::Result<Vec<u8>> {
    let len = range
        .end
        .checked_sub(range.start)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "inverted range"))?;
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, range.start)?;
    Ok(v)
}

impl SpanSource for FileSource {
    fn fetch(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        read_range(&self.blob, range)
    }

    fn fetch_windows(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        match &self.windows {
            Some(w) => read_range(w, range),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "this source has no windows blob",
            )),
        }
    }
}
