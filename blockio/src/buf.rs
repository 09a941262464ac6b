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
    layout: Layout,
}

// SAFETY: the buffer owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("valid layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(
            !ptr.is_null(),
            "out of memory allocating {len} aligned bytes"
        );
        AlignedBuf { ptr, len, layout }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}
