//! `cstore device selfcheck` on this machine's disk (a file under /var/tmp):
//! the pattern goes through the engine on both backends and verifies; data
//! in an existing file is never overwritten without --destroy-data. And
//! `cstore device info` on ext4 with and without a journal: what the policy
//! makes of each.

use std::process::Command;

use serde_json::Value;

mod common;
use common::loopfs::LoopFs;

fn cstore() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cstore"))
}

#[test]
fn selfcheck_verifies_a_new_file_on_both_backends_and_removes_it() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("check");
    // CSTORE_IO=sync (the fallback's test run) makes every ring sync.
    let auto = if std::env::var("CSTORE_IO").is_ok_and(|v| v == "sync") {
        "sync"
    } else {
        "iouring"
    };
    for (flag, backend) in [(None, auto), (Some("--sync"), "sync")] {
        let mut cmd = cstore();
        cmd.args(["device", "selfcheck"])
            .arg(&path)
            .args(["--size", "8m", "--offset", "64k", "--json"]);
        cmd.args(flag);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["backend"], backend, "{stdout}");
        assert_eq!(v["verified"], true, "{stdout}");
        assert_eq!(v["offset"], 64 << 10, "{stdout}");
        assert!(v["bytes"].as_u64().unwrap() >= 8 << 20, "{stdout}");
        assert_eq!(v["write"]["ios"], v["read"]["ios"], "{stdout}");
        assert!(!path.exists(), "a file the check created is removed");
    }
}

#[test]
fn selfcheck_refuses_existing_data_without_destroy_data() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, b"keep me").unwrap();
    let out = cstore()
        .args(["device", "selfcheck"])
        .arg(&path)
        .args(["--size", "1m"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--destroy-data") && err.contains("precious"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");

    let out = cstore()
        .args(["device", "selfcheck"])
        .arg(&path)
        .args(["--size", "1m", "--destroy-data"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("PASS "));
    assert!(path.exists(), "an existing file stays (overwritten)");
}

#[test]
fn info_tells_a_journaled_ext4_from_one_without_and_batches_small_files_only_on_the_first() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (mkfs, journal) in [(&[][..], true), (&["-O", "^has_journal"][..], false)] {
        let fs = LoopFs::with_mkfs(64, mkfs);
        let out = cstore()
            .args(["device", "info", "--json"])
            .arg(&fs.mnt)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["device"]["filesystem"]["kind"], "ext4", "{stdout}");
        assert_eq!(v["device"]["filesystem"]["journal"], journal, "{stdout}");
        assert_eq!(
            v["device"]["chain"][0],
            fs.dev.trim_start_matches("/dev/"),
            "{stdout}"
        );
        let batch = v["policy"]["batch_small_files"].as_bool().unwrap();
        assert_eq!(batch, journal && cores >= 2, "{stdout}");
        let reason = v["policy"]["reason"].as_str().unwrap();
        assert!(reason.contains("small files"), "{reason}");
        // The text form says the same.
        let out = cstore()
            .args(["device", "info"])
            .arg(&fs.mnt)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if journal {
            "ext4 (journal)"
        } else {
            "ext4 (no journal)"
        };
        assert!(text.contains(want), "{text}");
    }
}
