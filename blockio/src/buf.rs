//! Buffers the kernel reads into and writes from: plain heap vectors, or
//! aligned ones for O_DIRECT (which needs buffer, offset and length aligned
//! to the device's logical block size).

use std::alloc::{alloc_zeroed, dealloc, Layout};

pub enum Buf {
    Heap(Vec<u8>),
    Aligned(AlignedBuf),
    /// Shared, read-only bytes (e.g. a network body chunk) handed to a write
    /// without copying. Only for writes: the kernel never stores into it.
    Shared(bytes::Bytes),
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.len())
    }
}

impl Buf {
    pub fn len(&self) -> usize {
        match self {
            Buf::Heap(v) => v.len(),
            Buf::Aligned(a) => a.len,
            Buf::Shared(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            Buf::Heap(v) => v.as_mut_ptr(),
            Buf::Aligned(a) => a.ptr,
            // Write ops only read through this pointer (see `Shared`).
            Buf::Shared(b) => b.as_ptr().cast_mut(),
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Heap(v) => v,
            // SAFETY: ptr is valid for len bytes for the life of the buffer.
            Buf::Aligned(a) => unsafe { std::slice::from_raw_parts(a.ptr, a.len) },
            Buf::Shared(b) => b,
        }
    }
    /// Panics for `Shared` bytes, which are read-only.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Heap(v) => v,
            // SAFETY: as above, and we hold the only reference.
            Buf::Aligned(a) => unsafe { std::slice::from_raw_parts_mut(a.ptr, a.len) },
            Buf::Shared(_) => panic!("Buf::Shared is read-only: use it for writes only"),
        }
    }
}

/// Zeroed memory aligned to `align` bytes.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    alloc: Alloc,
}

enum Alloc {
    Heap(Layout),
    /// An anonymous mapping of this many bytes (see `AlignedBuf::huge`).
    Mapped(usize),
}

// SAFETY: the buffer owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

/// Transparent huge page size on x86-64 and 4K-page arm64 (elsewhere the
/// alignment is merely larger than needed).
const HUGE: usize = 2 << 20;

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("valid layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(
            !ptr.is_null(),
            "out of memory allocating {len} aligned bytes"
        );
        AlignedBuf {
            ptr,
            len,
            alloc: Alloc::Heap(layout),
        }
    }

    /// `len` zeroed bytes, aligned to 2 MiB, that the kernel may back with
    /// transparent huge pages (MADV_HUGEPAGE, where THP is `madvise` or
    /// `always`): an O_DIRECT request into physically contiguous memory is a
    /// few segments, so the block layer does not split a 1 MiB request at a
    /// queue's segment limit (128 pages of 4 KiB on many: 512 KiB). Ordinary
    /// pages where the kernel will not (still correctly aligned).
    pub fn huge(len: usize) -> AlignedBuf {
        let map = len.max(1).next_multiple_of(HUGE);
        // Room to align the start: the part before and after is unmapped.
        let over = map + HUGE;
        // SAFETY: a fresh anonymous private mapping, no address hint.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            raw != libc::MAP_FAILED,
            "out of memory mapping {len} bytes: {}",
            std::io::Error::last_os_error()
        );
        let start = (raw as usize).next_multiple_of(HUGE);
        let head = start - raw as usize;
        let tail = over - head - map;
        // SAFETY: both ranges are parts of the mapping just made, outside
        // [start, start + map); MADV_HUGEPAGE only advises.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + map) as *mut libc::c_void, tail);
            }
            libc::madvise(start as *mut libc::c_void, map, libc::MADV_HUGEPAGE);
        }
        AlignedBuf {
            ptr: start as *mut u8,
            len,
            alloc: Alloc::Mapped(map),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.alloc {
            // SAFETY: allocated with this layout in `new`.
            Alloc::Heap(layout) => unsafe { dealloc(self.ptr, layout) },
            // SAFETY: mapped with this length in `huge`, used by nothing else.
            Alloc::Mapped(map) => unsafe {
                libc::munmap(self.ptr.cast(), map);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_buffers_are_aligned_zeroed_and_writable_to_the_end() {
        for len in [2, 4096, 1 << 20, (2 << 20) + 1] {
            let mut b = Buf::Aligned(AlignedBuf::huge(len));
            assert_eq!(b.len(), len);
            assert_eq!(b.as_mut_ptr() as usize % HUGE, 0, "{len}: 2 MiB aligned");
            assert!(b.as_slice().iter().all(|&x| x == 0), "{len}: zeroed");
            b.as_mut_slice()[len - 1] = 7;
            b.as_mut_slice()[0] = 9;
            assert_eq!((b.as_slice()[0], b.as_slice()[len - 1]), (9, 7));
        }
    }
}
