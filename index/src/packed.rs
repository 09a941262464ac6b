//! An index blob as `cstore index push` publishes it: zstd-compressed.
//!
//! The entry table is mostly small integers, zeros and repeated name
//! components: the bench image's indexes shrink 5–7× (4.9 MB to 0.75 MB at
//! level 19), and a lazy start fetches its indexes before any file. Only the
//! transport is compressed: the bytes inside are the v1 format, stored and
//! validated ([`crate::Index::parse`]) as they are.

use std::io::Read;

use crate::error::{invalid, Result};

/// zstd level for published indexes: compressed once at push, read by
/// every lazy pull.
pub const LEVEL: i32 = 19;

/// Compress an index blob for publishing.
pub fn pack(index: &[u8]) -> Result<Vec<u8>> {
    Ok(zstd::bulk::compress(index, LEVEL)?)
}

/// Decompress a published index blob, refusing one that expands past `cap`
/// bytes (a small hostile blob must not become gigabytes in memory) or is
/// not one complete zstd stream. The result is not validated here: the
/// caller parses it as an index.
pub fn unpack(packed: &[u8], cap: u64) -> Result<Vec<u8>> {
    let dec = zstd::stream::read::Decoder::with_buffer(packed)
        .map_err(|e| invalid(format!("compressed index: {e}")))?;
    let mut out = Vec::new();
    dec.take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| invalid(format!("compressed index: {e}")))?;
    if out.len() as u64 > cap {
        return Err(invalid(format!(
            "compressed index expands past {cap} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_caps() {
        let raw: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 7).to_le_bytes())
            .collect();
        let p = pack(&raw).unwrap();
        assert!(p.len() * 10 < raw.len(), "{} -> {}", raw.len(), p.len());
        assert_eq!(unpack(&p, raw.len() as u64).unwrap(), raw);
        let e = unpack(&p, raw.len() as u64 - 1).unwrap_err().to_string();
        assert!(e.contains("expands past"), "{e}");
        let e = unpack(&p[..p.len() / 2], 1 << 30).unwrap_err().to_string();
        assert!(e.contains("compressed index"), "{e}");
        assert!(unpack(b"not zstd at all", 1 << 20).is_err());
    }
}
