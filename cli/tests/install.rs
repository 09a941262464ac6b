//! `cstore install --destdir SCRATCH`: the files it writes, containerd 1.6
//! itself reading the resulting config (its `config dump` merges imports),
//! a second install changing nothing, and `--uninstall` leaving the scratch
//! root exactly as it was (files, bytes, modes, directories).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::harness::Cstore;

/// Every entry under `root`: relative path → (mode, contents or "dir").
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = md.permissions().mode();
            if md.is_dir() {
                out.insert(rel, (mode, b"dir".to_vec()));
                stack.push(p);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn install(cs: &Cstore, dest: &Path, extra: &[&str]) -> String {
    let mut args = vec!["install", "--destdir", dest.to_str().unwrap()];
    args.extend_from_slice(extra);
    cs.ok(&args)
}

/// containerd's merged config, with DEST/etc as /etc (a private mount
/// namespace, so the absolute import path resolves into the scratch root).
fn containerd_config_dump(dest: &Path) -> String {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$1/etc\" /etc && exec containerd --config /etc/containerd/config.toml config dump")
        .arg("sh")
        .arg(dest)
        .output()
        .expect("run containerd");
    assert!(
        out.status.success(),
        "containerd config dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const USER_CONFIG: &str = r#"# the node's own containerd config: kept byte for byte
version = 2
root = "/var/lib/containerd-node"

[grpc]
  address = "/run/containerd/containerd.sock"   # a comment that must stay

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
"#;

#[test]
fn install_into_a_scratch_root_and_uninstall_leaves_it_as_before() {
    let cs = Cstore::new();
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    std::fs::create_dir_all(d.join("etc/containerd")).unwrap();
    std::fs::write(d.join("etc/containerd/config.toml"), USER_CONFIG).unwrap();
    std::fs::set_permissions(
        d.join("etc/containerd/config.toml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(d.join("usr/bin")).unwrap();
    let before = tree(d);

    install(&cs, d, &["--metrics-address", "127.0.0.1:9311"]);

    // The binary: this build's, executable.
    let bin = d.join("usr/local/bin/cstore");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_cstore")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let ok = Command::new(&bin).arg("--version").output().unwrap();
    assert!(ok.status.success());
    // The unit: the documented one, with this install's ExecStart.
    let unit =
        std::fs::read_to_string(d.join("etc/systemd/system/cstore-snapshotter.service")).unwrap();
    let exec = format!(
        "ExecStart=/usr/local/bin/cstore --root {} snapshotter serve --address /run/cstore/snapshotter.sock --metrics-address 127.0.0.1:9311",
        cs.path().display()
    );
    assert!(unit.lines().any(|l| l == exec), "{unit}");
    assert_eq!(unit.matches("ExecStart=").count(), 1);
    // Not lazy: nothing of the lazy daemon's unit.
    assert!(!unit.contains("cstore-lazy"), "{unit}");
    for key in [
        "KillMode=process",
        "Before=containerd.service",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(key), "{key} missing:\n{unit}");
    }
    // config.toml: the user's bytes plus one imports line, its mode kept.
    let cfg_path = d.join("etc/containerd/config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert_eq!(
        std::fs::metadata(&cfg_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let added: Vec<&str> = cfg
        .lines()
        .filter(|l| !USER_CONFIG.lines().any(|u| u == *l))
        .collect();
    assert_eq!(
        added,
        [r#"imports = ["/etc/containerd/cstore.toml"]"#],
        "{cfg}"
    );
    assert_eq!(
        cfg.replace("imports = [\"/etc/containerd/cstore.toml\"]\n", ""),
        USER_CONFIG
    );

    // containerd reads it: the proxy plugin and the user's settings, merged.
    let dump = containerd_config_dump(d);
    assert!(dump.contains("[proxy_plugins.cstore]"), "{dump}");
    assert!(
        dump.contains(r#"address = "/run/cstore/snapshotter.sock""#),
        "{dump}"
    );
    assert!(dump.contains(r#"type = "snapshot""#), "{dump}");
    assert!(
        dump.contains(r#"root = "/var/lib/containerd-node""#),
        "{dump}"
    );

    // Again: nothing changes (no second import), the record keeps what the
    // first install did.
    let after_first = tree(d);
    install(&cs, d, &["--metrics-address", "127.0.0.1:9311"]);
    assert_eq!(tree(d), after_first);

    cs.ok(&["install", "--destdir", d.to_str().unwrap(), "--uninstall"]);
    let after = tree(d);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "entries differ"
    );
    assert_eq!(after, before, "contents or modes differ");
    // Nothing more to undo.
    let (code, _, err) = cs.outcome(&["install", "--destdir", d.to_str().unwrap(), "--uninstall"]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to uninstall"), "{err}");
}

#[test]
fn install_without_a_containerd_config_makes_one_and_takes_it_back() {
    let cs = Cstore::new();
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    install(&cs, d, &["--socket", "/run/cstore/other.sock"]);
    let cfg = std::fs::read_to_string(d.join("etc/containerd/config.toml")).unwrap();
    assert_eq!(
        cfg,
        "version = 2\nimports = [\"/etc/containerd/cstore.toml\"]\n"
    );
    let dump = containerd_config_dump(d);
    assert!(
        dump.contains(r#"address = "/run/cstore/other.sock""#),
        "{dump}"
    );
    cs.ok(&["install", "--destdir", d.to_str().unwrap(), "--uninstall"]);
    assert!(tree(d).is_empty(), "left: {:?}", tree(d).keys());
}

#[test]
fn install_appends_to_existing_imports_and_uninstall_restores_them() {
    let cs = Cstore::new();
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    std::fs::create_dir_all(d.join("etc/containerd")).unwrap();
    let user =
        "version = 2\nimports = [\"/etc/containerd/other.toml\"]\n\n[debug]\n  level = \"info\"\n";
    std::fs::write(d.join("etc/containerd/config.toml"), user).unwrap();
    std::fs::write(
        d.join("etc/containerd/other.toml"),
        "version = 2\n[metrics]\n  address = \"127.0.0.1:1338\"\n",
    )
    .unwrap();
    let before = tree(d);
    install(&cs, d, &[]);
    let cfg = std::fs::read_to_string(d.join("etc/containerd/config.toml")).unwrap();
    assert!(
        cfg.contains(r#"imports = ["/etc/containerd/other.toml", "/etc/containerd/cstore.toml"]"#),
        "{cfg}"
    );
    let dump = containerd_config_dump(d);
    assert!(dump.contains("[proxy_plugins.cstore]"), "{dump}");
    assert!(
        dump.contains("127.0.0.1:1338"),
        "the user's import still merged: {dump}"
    );
    cs.ok(&["install", "--destdir", d.to_str().unwrap(), "--uninstall"]);
    assert_eq!(tree(d), before);
}

/// `--lazy`: the lazy daemon's unit (the documented one, which
/// fixtures/systemd-vm.sh runs under systemd, with this store) and the
/// snapshotter serving remote snapshots; a plain install takes the lazy unit
/// away again; uninstall leaves nothing.
#[test]
fn install_lazy_adds_the_lazy_daemons_unit_and_a_plain_install_takes_it_back() {
    let cs = Cstore::new();
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let lazy_path = d.join("etc/systemd/system/cstore-lazy.service");
    let snap_path = d.join("etc/systemd/system/cstore-snapshotter.service");
    let snap_exec = |unit: &str| {
        unit.lines()
            .find(|l| l.starts_with("ExecStart="))
            .unwrap()
            .to_string()
    };

    install(&cs, d, &["--lazy"]);
    let lazy = std::fs::read_to_string(&lazy_path).unwrap();
    let exec = format!(
        "ExecStart=/usr/local/bin/cstore --root {} lazy-serve",
        cs.path().display()
    );
    assert!(lazy.lines().any(|l| l == exec), "{lazy}");
    assert_eq!(lazy.matches("ExecStart=").count(), 1);
    // Every other line of the documented unit, in order; no hand-install hint.
    let documented: Vec<&str> = include_str!("../../docs/cstore-lazy.service")
        .lines()
        .filter(|l| !l.starts_with("# Install as") && !l.starts_with("#   systemctl"))
        .collect();
    let written: Vec<&str> = lazy.lines().collect();
    assert_eq!(written.len(), documented.len(), "{lazy}");
    for (w, doc) in written.iter().zip(&documented) {
        if !doc.starts_with("ExecStart=") {
            assert_eq!(w, doc);
        }
    }
    let snap = std::fs::read_to_string(&snap_path).unwrap();
    assert!(snap.contains("\nWants=cstore-lazy.service\n"), "{snap}");
    assert!(
        snap_exec(&snap)
            .ends_with(" snapshotter serve --address /run/cstore/snapshotter.sock --lazy"),
        "{snap}"
    );

    // Without --lazy: the snapshotter's unit loses it, the lazy unit goes.
    let out = install(&cs, d, &[]);
    assert!(!lazy_path.exists(), "{out}");
    assert!(
        out.contains(&format!("removed  {}", lazy_path.display())),
        "{out}"
    );
    let snap = std::fs::read_to_string(&snap_path).unwrap();
    assert!(!snap_exec(&snap).contains("--lazy"), "{snap}");

    install(&cs, d, &["--lazy"]);
    assert!(lazy_path.exists());
    let out = cs.ok(&["install", "--destdir", d.to_str().unwrap(), "--uninstall"]);
    assert!(
        out.contains(&format!("removed  {}", lazy_path.display())),
        "{out}"
    );
    assert!(tree(d).is_empty(), "left: {:?}", tree(d).keys());
}
