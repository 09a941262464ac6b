//! The few zlib calls zran needs, through libz-rs-sys (zlib-rs's zlib API as
//! Rust functions), behind a safe type. flate2 cannot do this: it has no
//! `Z_BLOCK`, no `data_type`, no `inflatePrime` and no `inflateGetDictionary`.

use libz_rs_sys as z;

use crate::format::WINDOW_SIZE;

pub(crate) const Z_OK: i32 = z::Z_OK;
pub(crate) const Z_STREAM_END: i32 = z::Z_STREAM_END;
pub(crate) const Z_BUF_ERROR: i32 = z::Z_BUF_ERROR;
pub(crate) const Z_NO_FLUSH: i32 = z::Z_NO_FLUSH;
pub(crate) const Z_BLOCK: i32 = z::Z_BLOCK;

/// windowBits for a gzip member (header and trailer checked).
pub(crate) const GZIP: i32 = 31;
/// windowBits for raw deflate (resuming mid-member).
pub(crate) const RAW: i32 = -15;

/// One call's outcome.
pub(crate) struct Step {
    pub ret: i32,
    pub consumed: usize,
    pub produced: usize,
    /// Bits unused in the last input byte | 64 in the last block | 128 at a
    /// block boundary (or right after a gzip header).
    pub data_type: i32,
}

/// An inflate stream. Boxed: zlib's state points back at the `z_stream`.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream owns its state; nothing in it is tied to a thread.
unsafe impl Send for Inflater {}

impl Inflater {
    pub fn new(window_bits: i32) -> Self {
        let mut strm: Box<z::z_stream> = Box::default();
        // SAFETY: a zeroed, boxed z_stream (Default), the library's own
        // version string and the struct's size, as inflateInit2 passes them.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        // Only a bad argument or out of memory fail here; both are bugs or
        // fatal, like any allocation failure.
        assert_eq!(ret, Z_OK, "inflateInit2 failed ({ret})");
        Inflater { strm }
    }

    pub fn reset(&mut self, window_bits: i32) {
        // SAFETY: an initialised stream.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        assert_eq!(ret, Z_OK, "inflateReset2 failed ({ret})");
    }

    /// Feed `bits` (1..=7) bits of `value` before the next input byte.
    pub fn prime(&mut self, bits: u8, value: u8) -> i32 {
        // SAFETY: an initialised stream.
        unsafe { z::inflatePrime(&mut *self.strm, bits as i32, (value >> (8 - bits)) as i32) }
    }

    pub fn set_dictionary(&mut self, dict: &[u8]) -> i32 {
        debug_assert!(dict.len() <= WINDOW_SIZE);
        // SAFETY: an initialised stream; `dict` is valid for its length.
        unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) }
    }

    /// The current window (the last ≤ 32 KiB of this member's output).
    pub fn dictionary<'a>(&self, buf: &'a mut [u8; WINDOW_SIZE]) -> &'a [u8] {
        let mut len: u32 = 0;
        // SAFETY: an initialised stream; 32 KiB is always enough room.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        assert_eq!(ret, Z_OK, "inflateGetDictionary failed ({ret})");
        &buf[..len as usize]
    }

    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> Step {
        let strm = &mut *self.strm;
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        strm.next_in = input.as_ptr();
        strm.avail_in = avail_in;
        strm.next_out = output.as_mut_ptr();
        strm.avail_out = avail_out;
        // SAFETY: next_in/next_out point into live slices for the lengths
        // given, for the duration of the call only (reset below).
        let ret = unsafe { z::inflate(strm, flush) };
        let step = Step {
            ret,
            consumed: (avail_in - strm.avail_in) as usize,
            produced: (avail_out - strm.avail_out) as usize,
            data_type: strm.data_type,
        };
        strm.next_in = std::ptr::null();
        strm.avail_in = 0;
        strm.next_out = std::ptr::null_mut();
        strm.avail_out = 0;
        step
    }

    pub fn message(&self, ret: i32) -> String {
        let msg = self.strm.msg;
        if msg.is_null() {
            return format!("zlib error {ret}");
        }
        // SAFETY: zlib sets msg to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: an initialised stream, ended once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}
