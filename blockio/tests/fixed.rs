//! READ_FIXED / WRITE_FIXED on registered buffers, by registered file index
//! and by descriptor, on both backends (the stand-in does pread/pwrite).

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use cstore_blockio::{AlignedBuf, Backend, Buf, Done, Mode, Op, Ring};

fn run(ring: &mut Ring, op: Op) -> Done {
    ring.push(op, 7, false).unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        ring.submit(1).unwrap();
        ring.reap(&mut done);
    }
    done.pop().unwrap()
}

#[test]
fn fixed_buffers_and_files_round_trip_with_o_direct() {
    for (mode, backend) in [(Mode::Auto, Backend::IoUring), (Mode::Sync, Backend::Sync)] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let fd = f.as_raw_fd();
        let mut ring = Ring::new(4, false, mode);
        assert_eq!(ring.backend(), backend);
        let mut bufs = vec![
            Buf::Aligned(AlignedBuf::new(8192, 4096)),
            Buf::Aligned(AlignedBuf::new(8192, 4096)),
        ];
        for (i, b) in bufs[0].as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // SAFETY: the buffers outlive the ring (dropped first, below).
        unsafe { ring.register_buffers(&mut bufs) }.unwrap();
        ring.register_files(&[fd]).unwrap();
        let mut bufs = bufs.into_iter();
        let (w, r) = (bufs.next().unwrap(), bufs.next().unwrap());

        let d = run(
            &mut ring,
            Op::WriteFixed {
                fd,
                file: Some(0),
                buf: w,
                buf_index: 0,
                offset: 4096,
            },
        );
        assert_eq!(d.result.unwrap(), 8192, "{backend:?}");
        let Op::WriteFixed { buf: w, .. } = d.op else {
            panic!()
        };
        // Read back by descriptor (not the registered file), into buffer 1.
        let d = run(
            &mut ring,
            Op::ReadFixed {
                fd,
                file: None,
                buf: r,
                buf_index: 1,
                offset: 4096,
            },
        );
        assert_eq!(d.result.unwrap(), 8192, "{backend:?}");
        let Op::ReadFixed { buf: r, .. } = d.op else {
            panic!()
        };
        assert!(r.as_slice() == w.as_slice(), "{backend:?}");
        drop(ring);
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 4096 + 8192);
        assert!(on_disk[..4096].iter().all(|b| *b == 0));
        assert!(on_disk[4096..] == *w.as_slice(), "{backend:?}");
    }
}
