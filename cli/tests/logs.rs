//! `--log-format json`: one JSON object per stderr line, with the image,
//! layer and duration fields a log shipper indexes; text under systemd
//! (JOURNAL_STREAM) has syslog priorities, no colours, no timestamps.

use crate::harness::{shared_registry_addr, Cstore};
use serde_json::Value;

#[test]
fn json_logs_of_a_pull_have_image_layer_and_duration() {
    let addr = shared_registry_addr();
    let cs = Cstore::new();
    let image = format!("{addr}/busybox:latest");
    let out = cs.run(&[
        "--log-format",
        "json",
        "--log-level",
        "info",
        "pull",
        &image,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let events: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let with =
        |msg: &str| -> Vec<&Value> { events.iter().filter(|e| e["message"] == msg).collect() };
    for e in &events {
        assert!(e["timestamp"].is_string() && e["level"].is_string(), "{e}");
    }
    let fetched: Vec<_> = with("fetched")
        .into_iter()
        .filter(|e| e["layer"].is_string())
        .collect();
    assert!(!fetched.is_empty(), "no layer fetched:\n{stderr}");
    for e in &fetched {
        assert_eq!(e["image"], image.as_str(), "{e}");
        assert!(e["layer"].as_str().unwrap().starts_with("sha256:"), "{e}");
        assert!(e["duration_ms"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(e["bytes"].as_u64().unwrap() > 0, "{e}");
    }
    let pulled = with("pulled");
    assert_eq!(pulled.len(), 1, "{stderr}");
    assert_eq!(pulled[0]["image"], image.as_str());
    assert!(pulled[0]["duration_ms"].as_f64().unwrap() > 0.0);
    let unpacked = with("unpacked");
    assert_eq!(unpacked.len(), fetched.len(), "{stderr}");
    for e in unpacked {
        assert_eq!(e["image"], image.as_str(), "{e}");
        assert!(fetched.iter().any(|f| f["layer"] == e["layer"]), "{e}");
        assert!(e["duration_ms"].as_f64().unwrap() > 0.0, "{e}");
    }
    assert_eq!(with("unpacked the image").len(), 1, "{stderr}");

    // A failing pull: the error as a JSON object naming the image.
    let missing = format!("{addr}/busybox:no-such-tag");
    let out = cs.run(&["--log-format", "json", "pull", &missing]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let err: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["message"] == "pull failed")
        .collect();
    assert_eq!(err.len(), 1, "{stderr}");
    assert_eq!(err[0]["level"], "ERROR");
    assert_eq!(err[0]["image"], missing.as_str());
}

/// Runs cstore with stderr to a file and JOURNAL_STREAM naming `stream`
/// (`None`: that file itself, as systemd would set it); its stderr.
fn pull_with_journal_stream(cs: &mut Cstore, image: &str, stream: Option<&str>) -> String {
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::NamedTempFile::new().unwrap();
    let md = f.as_file().metadata().unwrap();
    let value = stream.map_or(format!("{}:{}", md.dev(), md.ino()), String::from);
    cs.env.retain(|(k, _)| k != "JOURNAL_STREAM");
    cs.env.push(("JOURNAL_STREAM".into(), value));
    let st = cs
        .cmd(&["--log-level", "info", "pull", image])
        .stdout(std::process::Stdio::null())
        .stderr(f.reopen().unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read_to_string(f.path()).unwrap()
}

#[test]
fn text_logs_under_systemd_have_priorities_and_no_timestamps_or_colours() {
    let addr = shared_registry_addr();
    let image = format!("{addr}/busybox:latest");
    let mut cs = Cstore::new();
    let stderr = pull_with_journal_stream(&mut cs, &image, None);
    assert!(!stderr.contains('\x1b'), "colours: {stderr:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.iter().any(|l| l.contains("pulled")), "{stderr}");
    for l in lines {
        assert!(
            l.starts_with("<6> INFO ") || l.starts_with("<4> WARN ") || l.starts_with("<3>ERROR "),
            "{l:?}"
        );
    }
    // JOURNAL_STREAM inherited but stderr elsewhere (another stream), and no
    // JOURNAL_STREAM at all (not a terminal either): timestamps, no
    // priorities, no colours.
    let mut cs = Cstore::new();
    let elsewhere = pull_with_journal_stream(&mut cs, &image, Some("8:12345"));
    let cs = Cstore::new();
    let out = cs.run(&["--log-level", "info", "pull", &image]);
    let plain = String::from_utf8(out.stderr).unwrap();
    for stderr in [elsewhere, plain] {
        assert!(stderr.contains("pulled"), "{stderr}");
        assert!(
            !stderr.contains('\x1b') && !stderr.contains("<6>"),
            "{stderr:?}"
        );
        assert!(
            stderr
                .lines()
                .all(|l| l.as_bytes()[..4].iter().all(u8::is_ascii_digit)),
            "{stderr}"
        );
    }
}

/// `cstore images | head -1` and `cstore snapshots --json | grep -q x`: the
/// reader goes before the listing is written, and the listing must end as ls
/// does (SIGPIPE), not with Rust's "failed printing to stdout" panic.
#[test]
fn listings_into_a_closed_pipe_end_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let (cs, _) = crate::harness::containers::busybox();
    for args in [
        &["images"][..],
        &["images", "--json"],
        &["snapshots"],
        &["snapshots", "--json"],
        &["df"],
        &["ps", "--all"],
    ] {
        let mut child = cs
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cstore");
        // The read end goes at once: every write of the listing gets EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for cstore");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "cstore {args:?} into a closed pipe: {stderr}"
        );
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "cstore {args:?} into a closed pipe ended with {:?}: {stderr}",
            out.status
        );
    }
}
