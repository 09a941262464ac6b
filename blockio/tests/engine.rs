//! The engine's operations, each run on both backends (io_uring and the
//! plain-syscall fallback) and checked against the filesystem.

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use cstore_blockio::{AlignedBuf, Backend, Buf, Engine, Mode, Op};

fn engines() -> Vec<(Engine, Backend)> {
    let uring = Engine::with(2, 32, false, false, Mode::Auto);
    let sync = Engine::with(2, 32, false, false, Mode::Sync);
    assert_eq!(sync.backend(), Backend::Sync);
    // This machine has io_uring; the test must exercise it, not fall back.
    assert_eq!(
        uring.backend(),
        Backend::IoUring,
        "io_uring should be available here"
    );
    vec![(uring, Backend::IoUring), (sync, Backend::Sync)]
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

#[test]
fn batched_writes_then_vectored_reads_round_trip() {
    for (e, backend) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("data"))
            .unwrap();
        let fd = f.as_raw_fd();
        let pattern: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        // 16 writes of 64 KiB in one submission, then fsync.
        let ops: Vec<Op> = pattern
            .chunks(64 << 10)
            .enumerate()
            .map(|(i, c)| Op::Write {
                fd,
                buf: Buf::Heap(c.to_vec()),
                offset: (i * (64 << 10)) as u64,
            })
            .collect();
        for d in e.submit(fd, ops, false, None).wait() {
            assert_eq!(d.result.unwrap(), 64 << 10, "{backend:?}");
        }
        assert!(e.run(fd, Op::Fsync { fd, datasync: true }).result.is_ok());
        assert_eq!(
            fs::read(dir.path().join("data")).unwrap(),
            pattern,
            "{backend:?}: file content"
        );
        let done = e.run(
            fd,
            Op::Readv {
                fd,
                bufs: vec![Buf::Heap(vec![0; 1000]), Buf::Heap(vec![0; 24])],
                offset: 4096,
            },
        );
        assert_eq!(done.result.unwrap(), 1024);
        let Op::Readv { bufs, .. } = done.op else {
            panic!()
        };
        assert_eq!(
            [bufs[0].as_slice(), bufs[1].as_slice()].concat(),
            &pattern[4096..5120],
            "{backend:?}"
        );
        let d = e.run(
            fd,
            Op::Statx {
                dirfd: fd,
                path: c(""),
                flags: libc::AT_EMPTY_PATH,
                mask: libc::STATX_SIZE,
            },
        );
        assert!(d.result.is_ok());
        assert_eq!(d.statx.unwrap().stx_size, 1 << 20, "{backend:?}");
        assert!(e
            .run(
                fd,
                Op::Fallocate {
                    fd,
                    mode: 0,
                    offset: 0,
                    len: 2 << 20
                }
            )
            .result
            .is_ok());
        assert_eq!(
            f.metadata().unwrap().len(),
            2 << 20,
            "{backend:?}: fallocate extends"
        );
    }
}

#[test]
fn metadata_ops_make_a_tree() {
    for (e, backend) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::File::open(dir.path()).unwrap();
        let r = root.as_raw_fd();
        assert!(e
            .run(
                r,
                Op::MkdirAt {
                    dirfd: r,
                    path: c("d"),
                    mode: 0o750
                }
            )
            .result
            .is_ok());
        let open = e.run(
            r,
            Op::OpenAt {
                dirfd: r,
                path: c("d/f"),
                flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                mode: 0o640,
            },
        );
        let fd = open.result.unwrap() as i32;
        // write + close linked: close runs only after the write.
        let done = e
            .submit(
                fd,
                vec![
                    Op::Write {
                        fd,
                        buf: Buf::Heap(b"hello".to_vec()),
                        offset: 0,
                    },
                    Op::Close { fd },
                ],
                true,
                None,
            )
            .wait();
        assert!(
            done.iter().all(|d| d.result.is_ok()),
            "{backend:?}: {done:?}"
        );
        assert!(e
            .run(
                r,
                Op::SymlinkAt {
                    target: c("f"),
                    dirfd: r,
                    path: c("d/link")
                }
            )
            .result
            .is_ok());
        assert!(e
            .run(
                r,
                Op::LinkAt {
                    olddirfd: r,
                    oldpath: c("d/f"),
                    newdirfd: r,
                    newpath: c("d/hard"),
                    flags: 0
                }
            )
            .result
            .is_ok());
        assert!(e
            .run(
                r,
                Op::RenameAt {
                    olddirfd: r,
                    oldpath: c("d/hard"),
                    newdirfd: r,
                    newpath: c("d/moved"),
                    flags: 0
                }
            )
            .result
            .is_ok());
        let p = dir.path().join("d");
        assert_eq!(fs::read(p.join("f")).unwrap(), b"hello", "{backend:?}");
        assert_eq!(fs::read_link(p.join("link")).unwrap().to_str(), Some("f"));
        assert_eq!(
            fs::metadata(p.join("moved")).unwrap().ino(),
            fs::metadata(p.join("f")).unwrap().ino()
        );
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o750);
        assert!(e
            .run(
                r,
                Op::UnlinkAt {
                    dirfd: r,
                    path: c("d/moved"),
                    flags: 0
                }
            )
            .result
            .is_ok());
        assert!(!p.join("moved").exists());
        let err = e
            .run(
                r,
                Op::MkdirAt {
                    dirfd: r,
                    path: c("d"),
                    mode: 0o755,
                },
            )
            .result
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{backend:?}");
    }
}

#[test]
fn a_failed_op_cancels_the_rest_of_its_chain() {
    for (e, backend) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::File::create(dir.path().join("x")).unwrap();
        let fd = f.as_raw_fd();
        let done = e
            .submit(
                fd,
                vec![
                    Op::Read {
                        fd: -1,
                        buf: Buf::Heap(vec![0; 8]),
                        offset: 0,
                    },
                    Op::Write {
                        fd,
                        buf: Buf::Heap(b"no".to_vec()),
                        offset: 0,
                    },
                ],
                true,
                None,
            )
            .wait();
        assert_eq!(
            done[0].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF),
            "{backend:?}"
        );
        assert_eq!(
            done[1].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::ECANCELED),
            "{backend:?}"
        );
        assert_eq!(fs::metadata(dir.path().join("x")).unwrap().len(), 0);
    }
}

#[test]
fn direct_io_with_aligned_buffers() {
    for (e, backend) in engines() {
        // O_DIRECT needs a real block-backed filesystem, not tmpfs.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("d"))
            .unwrap();
        let fd = f.as_raw_fd();
        let mut b = Buf::Aligned(AlignedBuf::new(1 << 16, 4096));
        b.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 251) as u8);
        let want = b.as_slice().to_vec();
        assert_eq!(
            e.run(
                fd,
                Op::Write {
                    fd,
                    buf: b,
                    offset: 8192
                }
            )
            .result
            .unwrap(),
            1 << 16,
            "{backend:?}"
        );
        let d = e.run(
            fd,
            Op::Read {
                fd,
                buf: Buf::Aligned(AlignedBuf::new(1 << 16, 4096)),
                offset: 8192,
            },
        );
        assert_eq!(d.result.unwrap(), 1 << 16);
        let Op::Read { buf, .. } = d.op else { panic!() };
        assert_eq!(buf.as_slice(), &want[..], "{backend:?}");
    }
}

#[test]
fn completions_are_futures_too() {
    let e = Engine::with(1, 8, false, false, Mode::Auto);
    let dir = tempfile::tempdir().unwrap();
    let f = fs::File::create(dir.path().join("a")).unwrap();
    let fd = f.as_raw_fd();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let n = rt.block_on(async {
        e.submit(
            fd,
            vec![Op::Write {
                fd,
                buf: Buf::Heap(vec![7; 100]),
                offset: 0,
            }],
            false,
            None,
        )
        .await
    });
    assert_eq!(n[0].result.as_ref().unwrap(), &100);
}
