//! `cstore device selfcheck` on this machine's disk (a file under /var/tmp):
//! the pattern goes through the engine on both backends and verifies; data
//! in an existing file is never overwritten without --destroy-data. And
//! `cstore device info` on ext4 with and without a journal: what the policy
//! makes of each.

use serde_json::Value;

use crate::harness::loopfs::LoopFs;
use crate::harness::Cstore;

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
    let cs = Cstore::new();
    let p = path.to_str().unwrap();
    for (flag, backend) in [(None, auto), (Some("--sync"), "sync")] {
        let mut args = vec!["device", "selfcheck", p];
        args.extend(["--size", "8m", "--offset", "64k", "--json"]);
        args.extend(flag);
        let stdout = cs.ok(&args);
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
    let cs = Cstore::new();
    let p = path.to_str().unwrap();
    let err = cs.fail(&["device", "selfcheck", p, "--size", "1m"]);
    assert!(
        err.contains("--destroy-data") && err.contains("precious"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");

    let out = cs.ok(&["device", "selfcheck", p, "--size", "1m", "--destroy-data"]);
    assert!(out.starts_with("PASS "));
    assert!(path.exists(), "an existing file stays (overwritten)");
}

#[test]
fn info_tells_a_journaled_ext4_from_one_without_and_batches_small_files_only_on_the_first() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cs = Cstore::new();
    for (mkfs, journal) in [(&[][..], true), (&["-O", "^has_journal"][..], false)] {
        let fs = LoopFs::with_mkfs(64, mkfs);
        let mnt = fs.mnt.to_str().unwrap();
        let stdout = cs.ok(&["device", "info", "--json", mnt]);
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
        let text = cs.ok(&["device", "info", mnt]);
        let want = if journal {
            "ext4 (journal)"
        } else {
            "ext4 (no journal)"
        };
        assert!(text.contains(want), "{text}");
    }
}

/// `CSTORE_POLICY` makes the policy that of another device kind (the bench
/// suite compares policies on one device that way); an unknown kind is
/// refused by name before anything runs.
#[test]
fn cstore_policy_forces_the_policy_of_a_device_kind() {
    let fs = LoopFs::new(64);
    let p = fs.mnt.to_str().unwrap();
    let mut cs = Cstore::new();
    let probed: Value = serde_json::from_str(&cs.ok(&["device", "info", "--json", p])).unwrap();
    assert_ne!(probed["device"]["kind"], "nvme", "{probed}");
    assert!(!probed["policy"]["reason"]
        .as_str()
        .unwrap()
        .contains("CSTORE_POLICY"));

    cs.env = vec![("CSTORE_POLICY".into(), "nvme".into())];
    let forced: Value = serde_json::from_str(&cs.ok(&["device", "info", "--json", p])).unwrap();
    let policy = &forced["policy"];
    assert_eq!(
        forced["device"]["kind"], probed["device"]["kind"],
        "the probe is unchanged"
    );
    assert_eq!(
        (policy["queue_depth"].as_u64(), policy["direct"].as_bool()),
        (Some(128), Some(true)),
        "{forced}"
    );
    assert!(
        policy["reason"]
            .as_str()
            .unwrap()
            .starts_with("CSTORE_POLICY=nvme (the probe says "),
        "{forced}"
    );

    cs.env = vec![("CSTORE_POLICY".into(), "hdd".into())];
    let hdd: Value = serde_json::from_str(&cs.ok(&["device", "info", "--json", p])).unwrap();
    assert_eq!(
        (
            hdd["policy"]["rings"].as_u64(),
            hdd["policy"]["queue_depth"].as_u64(),
            hdd["policy"]["streams"].as_u64()
        ),
        (Some(1), Some(4), Some(1)),
        "{hdd}"
    );

    cs.env = vec![("CSTORE_POLICY".into(), "floppy".into())];
    let err = cs.fail(&["device", "info", p]);
    assert!(
        err.contains("\"floppy\"") && err.contains("CSTORE_POLICY"),
        "{err}"
    );
}
