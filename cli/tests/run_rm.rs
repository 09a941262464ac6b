//! `cstore run --rm` and its databases: free for other processes while the
//! container runs (a run holds them from its first use through the
//! prepare, never across the container's life), and what a crash leaves of
//! an `--rm` container (whose record is not synced: after a crash it may be
//! empty or missing) listed by `ps -a` and removed by `rm`.

use serde_json::Value;

use crate::harness::containers::{busybox, unique, Background};
use crate::harness::Cstore;

/// `run --rm --name NAME IMAGE sleep 30` in the background, once `ps`
/// shows it running; the init's host pid.
fn sleeper(cs: &Cstore, image: &str, name: &str) -> (Background, u32) {
    let (bg, c) = cs.start_running(&["run", "--rm", "--name", name, image, "sleep", "30"], name);
    (bg, c["pid"].as_u64().unwrap() as u32)
}

/// While an `--rm` container runs, other processes read and write both
/// databases (`snapshots`, `images`, `gc`: a database still held by the
/// run would make each wait two minutes and fail); the container's
/// snapshot is theirs to see (its commit is durable and visible), and gc
/// keeps the layers under it.
#[test]
fn the_databases_are_free_while_an_rm_container_runs() {
    let (cs, image) = busybox();
    let name = unique("rmdb");
    let (mut bg, _) = sleeper(&cs, &image, &name);
    let snaps = cs.ok(&["snapshots", "--json"]);
    assert!(snaps.contains(&format!("cstore-run:{name}")), "{snaps}");
    assert!(cs.images().iter().any(|i| i["name"] == image.as_str()));
    cs.ok(&["gc"]);
    let after = cs.ok(&["snapshots", "--json"]);
    assert_eq!(
        after.matches("\"kind\"").count(),
        snaps.matches("\"kind\"").count(),
        "gc removed a snapshot under a running container: {snaps} -> {after}"
    );
    assert_eq!(cs.ok(&["rm", "-f", &name]).trim(), name);
    let status = bg.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGKILL),
        "run reports the kill"
    );
    cs.assert_container_gone(&name);
    let (code, out, err) = cs.run_rm(&[&image, "echo", "ok"]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// A crash while an `--rm` container runs: its `cstore run` and the
/// container die at once, and its record, never synced, is left empty or
/// missing. `ps -a` lists the container as exited; `rm` removes its mount,
/// snapshot, directory and runtime state; the image still runs.
#[test]
fn an_rm_container_a_crash_left_is_listed_and_removed() {
    let (cs, image) = busybox();
    for record in ["empty", "missing"] {
        let name = unique(&format!("rmcrash-{record}"));
        let (mut bg, init) = sleeper(&cs, &image, &name);
        // SAFETY: kill(2) on the init `ps` just showed running.
        unsafe { libc::kill(init as i32, libc::SIGKILL) };
        bg.0.kill().unwrap();
        bg.0.wait().unwrap();
        let file = cs
            .path()
            .join("containers")
            .join(&name)
            .join("container.json");
        match record {
            "empty" => std::fs::write(&file, b"").unwrap(),
            _ => std::fs::remove_file(&file).unwrap(),
        }
        let c = cs
            .ps(true)
            .into_iter()
            .find(|c| c["name"] == name.as_str())
            .unwrap_or_else(|| panic!("ps -a lacks {name} ({record} record)"));
        assert_eq!(c["state"], "exited", "{c}");
        assert_eq!(cs.ok(&["rm", &name]).trim(), name);
        cs.assert_container_gone(&name);
    }
    cs.ok(&["gc"]);
    let (code, out, err) = cs.run_rm(&[&image, "echo", "ok"]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// `cstore run --rm`s started at once all run: each holds a database from
/// its first use through its prepare, and never one while waiting for the
/// other (two runs that did each held one and waited for the other until
/// the two-minute open timeout failed them).
#[test]
fn rm_runs_started_at_once_all_run() {
    let (cs, image) = busybox();
    let runs: Vec<_> = (0..8)
        .map(|i| {
            cs.cmd(&["run", "--rm", &image, "echo", &format!("run {i}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "run {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("run {i}")
        );
    }
    cs.assert_no_containers();
}

/// An image pulled without unpacking is unpacked by `run`: the run lets
/// its snapshot tree go for the unpack (which opens its own; holding it,
/// the unpack would wait two minutes and fail).
#[test]
fn run_unpacks_an_image_pulled_without_unpacking() {
    let cs = Cstore::new();
    let image = format!("{}/busybox:latest", crate::harness::shared_registry_addr());
    cs.ok(&["pull", "--no-unpack", &image]);
    let (code, out, err) = cs.run_rm(&[&image, "echo", "ok"]);
    // (The unpack's progress comes first, on stdout too.)
    assert_eq!((code, out.lines().last()), (0, Some("ok")), "{out}{err}");
    let snaps: Vec<Value> = serde_json::from_str(&cs.ok(&["snapshots", "--json"])).unwrap();
    assert!(
        !snaps.is_empty() && snaps.iter().all(|s| s["kind"] == "committed"),
        "the image's layers, nothing of the container: {snaps:?}"
    );
    cs.assert_no_containers();
}
