//! Every error reaches containerd as the gRPC code of its errdefs kind,
//! through the real service on a unix socket: not found, already exists,
//! failed precondition, invalid argument, and resource exhausted from a
//! tmpfs that is full. Unauthenticated has no path through the snapshots
//! API (it never talks to a registry): that mapping is checked on a real
//! registry's refusal, turned into a status as the service does it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cstore_os::ErrorKind;
use cstore_registry::{ClientOptions, Reference, RegistryClient};
use cstore_snapshotter::service::proto::containerd::services::snapshots::v1 as api;
use cstore_snapshotter::service::{self, status};
use cstore_snapshotter::{Error, Snapshotter};
use tonic::Code;

use api::snapshots_client::SnapshotsClient;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("fixtures")
        .join(name)
}

/// A small tmpfs, unmounted on drop (lazily, should anything still hold it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0711")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (root needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn prepare(key: &str, parent: &str) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "cstore".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    }
}

#[test]
fn errors_reach_containerd_as_their_kinds_codes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let fs = Tmpfs::mount(&root, "16m");
    let sock = dir.path().join("snapshotter.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sn = Arc::new(Snapshotter::open(&root).unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let sock = sock.clone();
            async move {
                service::serve(sn, &sock, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the service did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = SnapshotsClient::connect(format!("unix://{}", sock.display()))
            .await
            .unwrap();

        let e = c
            .stat(api::StatSnapshotRequest {
                snapshotter: "cstore".into(),
                key: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("missing"), "{e:?}");

        c.prepare(prepare("a", "")).await.unwrap();
        let e = c.prepare(prepare("a", "")).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

        // An active snapshot cannot be a parent; a parent with children
        // cannot go.
        let e = c.prepare(prepare("b", "a")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        c.commit(api::CommitSnapshotRequest {
            snapshotter: "cstore".into(),
            name: "layer".into(),
            key: "a".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
        c.prepare(prepare("b", "layer")).await.unwrap();
        let e = c
            .remove(api::RemoveSnapshotRequest {
                snapshotter: "cstore".into(),
                key: "layer".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("has children"), "{e:?}");

        let e = c.prepare(prepare("nul\0key", "")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        // The disk fills up: what cannot be written is exhausted, not unknown.
        let filler = root.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a; 1 << 20];
        loop {
            use std::io::Write;
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        let mut codes = Vec::new();
        for i in 0..50 {
            match c.prepare(prepare(&format!("full-{i}"), "layer")).await {
                Ok(_) => continue,
                Err(e) => {
                    codes.push((e.code(), e.message().to_string()));
                    break;
                }
            }
        }
        let (code, message) = codes.pop().expect("a Prepare on a full disk failed");
        assert_eq!(code, Code::ResourceExhausted, "{message}");

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
    drop(fs);
}

/// A registry that wants credentials, asked without: the store's error
/// (as a pull through the snapshotter's image code would return it) is
/// Unauthenticated to containerd.
#[test]
fn a_registry_refusing_without_credentials_is_unauthenticated() {
    let state = tempfile::Builder::new()
        .prefix("cstore-registry-")
        .tempdir()
        .unwrap();
    let out = Command::new("bash")
        .arg(fixture("registry.sh"))
        .arg("start")
        .arg(state.path())
        .args(["--htpasswd", "user:pass"])
        .output()
        .unwrap();
    let stop = || {
        let _ = Command::new("bash")
            .arg(fixture("registry.sh"))
            .arg("stop")
            .arg(state.path())
            .output();
    };
    if !out.status.success() {
        stop();
        panic!(
            "registry.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let client = RegistryClient::new(ClientOptions {
        plain_http: true,
        docker_config: false,
        ..ClientOptions::default()
    })
    .unwrap();
    let r: Reference = format!("{addr}/busybox:latest").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(client.manifest(&r, "latest"));
    stop();
    let e = Error::Store(cstore_store::Error::from(refused.unwrap_err()));
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    let s = status(e);
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains(&addr), "{s:?}");
}
