//! `cstore install [--destdir DIR] [--uninstall]`: puts cstore on a node in
//! one command, and takes it off again.
//!
//! Installs (under DESTDIR, `/` by default):
//! - the running binary as `usr/local/bin/cstore`;
//! - the snapshotter's systemd unit, `etc/systemd/system/cstore-snapshotter.service`
//!   (docs/cstore-snapshotter.service with this install's paths and options);
//! - with `lazy`, the lazy layers' daemon's unit too, `etc/systemd/system/cstore-lazy.service`
//!   (docs/cstore-lazy.service with this install's store), and the snapshotter
//!   serving remote snapshots (`--lazy`); an install without `lazy` takes a unit
//!   an earlier one made away again;
//! - containerd's proxy-plugin config as a drop-in, `etc/containerd/cstore.toml`,
//!   and its path in the `imports` of `etc/containerd/config.toml`: added to the
//!   array (or the key added, or the file made) only if absent, with the rest of
//!   the file kept byte for byte. The user's config is never rewritten otherwise.
//! - `etc/cstore/install.json`: what this install made or changed, so uninstall
//!   undoes exactly that (files and directories it made, the import it added).
//!
//! Every file is written atomically (temp file, fsync, rename).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const BINARY: &str = "usr/local/bin/cstore";
pub const UNIT: &str = "etc/systemd/system/cstore-snapshotter.service";
pub const LAZY_UNIT: &str = "etc/systemd/system/cstore-lazy.service";
pub const DROP_IN: &str = "etc/containerd/cstore.toml";
pub const CONTAINERD_CONFIG: &str = "etc/containerd/config.toml";
pub const RECORD: &str = "etc/cstore/install.json";

/// The unit as documented; ExecStart is filled in per install.
const UNIT_TEMPLATE: &str = include_str!("../../docs/cstore-snapshotter.service");
const LAZY_UNIT_TEMPLATE: &str = include_str!("../../docs/cstore-lazy.service");

#[derive(Clone, Debug)]
pub struct Options {
    /// Where `/` is (a scratch root in tests, an image being built).
    pub destdir: PathBuf,
    /// The binary to install (normally the running one).
    pub binary: PathBuf,
    /// The store root the daemon serves (`--root`).
    pub store_root: PathBuf,
    /// The snapshotter's socket, as containerd will dial it.
    pub socket: PathBuf,
    /// `--metrics-address` for the daemon, if any.
    pub metrics_address: Option<String>,
    /// Lazy layers: the snapshotter serves remote snapshots and the lazy
    /// daemon gets its own unit (whose fd store keeps the layers' FUSE
    /// connections across its restarts).
    pub lazy: bool,
}

/// How the install left containerd's config.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigChange {
    /// There was none: made with only `version` and `imports`.
    Created,
    /// There was one without `imports`: the key was added.
    KeyAdded,
    /// Its `imports` lacked the drop-in: the path was appended.
    Appended,
    /// It imported the drop-in already: untouched.
    Untouched,
}

/// What an install made, kept in `etc/cstore/install.json` (paths relative
/// to DESTDIR).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// Files this install made that were not there before.
    pub files: BTreeSet<String>,
    /// Directories this install made, deepest last.
    pub dirs: Vec<String>,
    pub containerd_config: Option<ConfigChange>,
    /// The path in `imports`, as containerd resolves it (without DESTDIR).
    pub import: String,
}

/// What `install` or `uninstall` did, for the user.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    /// Left in place, with why.
    pub kept: Vec<(PathBuf, String)>,
    pub containerd_config: Option<String>,
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, p, e)
}

fn abs(rel: &str) -> String {
    format!("/{rel}")
}

/// Writes `data` to `path` atomically with `mode`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".cstore-install-")
        .tempfile_in(dir)
        .map_err(io("create a temp file in", dir))?;
    tmp.write_all(data).map_err(io("write", path))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    tmp.as_file().sync_all().map_err(io("fsync", path))?;
    tmp.persist(path)
        .map_err(|e| Error::io("rename into", path, e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Makes `rel`'s parent directories under `dest`, recording the new ones.
fn make_parents(dest: &Path, rel: &str, record: &mut Record) -> Result<()> {
    let mut cur = PathBuf::new();
    let parent = Path::new(rel).parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        cur.push(c);
        let p = dest.join(&cur);
        if !p.exists() {
            std::fs::create_dir(&p).map_err(io("mkdir", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod", &p))?;
            let s = cur.to_string_lossy().into_owned();
            if !record.dirs.contains(&s) {
                record.dirs.push(s);
            }
        }
    }
    Ok(())
}

fn put(
    dest: &Path,
    rel: &str,
    data: &[u8],
    mode: u32,
    record: &mut Record,
    report: &mut Report,
) -> Result<()> {
    make_parents(dest, rel, record)?;
    let p = dest.join(rel);
    if !p.exists() {
        record.files.insert(rel.to_string());
    }
    write_atomic(&p, data, mode)?;
    report.written.push(p);
    Ok(())
}

fn load_record(dest: &Path) -> Result<Option<Record>> {
    let p = dest.join(RECORD);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Invalid {
                path: p,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", p, e)),
    }
}

/// The unit for these options: the documented one with its ExecStart.
pub fn unit(o: &Options) -> String {
    let mut exec = format!(
        "ExecStart={} --root {} snapshotter serve --address {}",
        abs(BINARY),
        o.store_root.display(),
        o.socket.display()
    );
    if let Some(m) = &o.metrics_address {
        exec.push_str(&format!(" --metrics-address {m}"));
    }
    if o.lazy {
        exec.push_str(" --lazy");
        return from_template(UNIT_TEMPLATE, &exec);
    }
    // Without lazy layers the unit has nothing to do with cstore-lazy.service.
    let mut skip_comment = false;
    from_template(UNIT_TEMPLATE, &exec)
        .lines()
        .filter(|l| {
            skip_comment = l.starts_with("# Lazy layers") || (skip_comment && l.starts_with('#'));
            !skip_comment && *l != "Wants=cstore-lazy.service"
        })
        .map(|l| l.replace(" cstore-lazy.service", "") + "\n")
        .collect()
}

/// The lazy daemon's unit for these options: the documented one (which
/// fixtures/systemd-vm.sh runs under systemd) with this install's store.
pub fn lazy_unit(o: &Options) -> String {
    let exec = format!(
        "ExecStart={} --root {} lazy-serve",
        abs(BINARY),
        o.store_root.display()
    );
    from_template(LAZY_UNIT_TEMPLATE, &exec)
}

/// `template` with `exec` as its ExecStart and without the lines telling how
/// to install it by hand.
fn from_template(template: &str, exec: &str) -> String {
    template
        .lines()
        .filter(|l| {
            !l.starts_with("# Install as")
                && !l.starts_with("#   systemctl")
                && !l.starts_with("# and add")
        })
        .map(|l| {
            if l.starts_with("ExecStart=") {
                exec.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// containerd's proxy-plugin config for the socket.
pub fn drop_in(socket: &Path) -> String {
    format!(
        "# cstore's proxy snapshotter for containerd: written by `cstore install`,\n\
         # removed by `cstore install --uninstall`. Imported by config.toml.\n\
         version = 2\n\n\
         [proxy_plugins]\n  [proxy_plugins.cstore]\n    type = \"snapshot\"\n    address = \"{}\"\n",
        socket.display()
    )
}

/// config.toml as install makes it where there was none (uninstall removes
/// it only while it still reads exactly so).
fn created_config(import: &str) -> String {
    format!("version = 2\nimports = [\"{import}\"]\n")
}

fn parse_config(path: &Path, text: &str) -> Result<toml_edit::DocumentMut> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| Error::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Writes the edited config.toml over the user's, keeping its mode.
fn rewrite_config(path: &Path, doc: &toml_edit::DocumentMut) -> Result<()> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    write_atomic(path, doc.to_string().as_bytes(), mode)
}

/// Adds `import` to config.toml's `imports` if absent.
fn add_import(path: &Path, import: &str) -> Result<ConfigChange> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(path, created_config(import).as_bytes(), 0o644)?;
            return Ok(ConfigChange::Created);
        }
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let mut doc = parse_config(path, &text)?;
    let change = match doc.get_mut("imports") {
        None => {
            let mut a = toml_edit::Array::new();
            a.push(import);
            // A top-level key must come before the first table: toml_edit
            // renders the root's keys first, after the ones already there.
            doc.insert("imports", toml_edit::value(a));
            ConfigChange::KeyAdded
        }
        Some(item) => {
            let arr = item.as_array_mut().ok_or_else(|| Error::Invalid {
                path: path.to_path_buf(),
                reason: "`imports` is not an array".into(),
            })?;
            if arr.iter().any(|v| v.as_str() == Some(import)) {
                ConfigChange::Untouched
            } else {
                arr.push(import);
                ConfigChange::Appended
            }
        }
    };
    if change != ConfigChange::Untouched {
        rewrite_config(path, &doc)?;
    }
    Ok(change)
}

/// Takes `import` out of config.toml's `imports` again (the key too if this
/// install added it, the file if it made it and nothing else was added).
fn remove_import(path: &Path, import: &str, change: ConfigChange) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    if change == ConfigChange::Created && text == created_config(import) {
        std::fs::remove_file(path).map_err(io("remove", path))?;
        return Ok(Some("removed (cstore install made it)".into()));
    }
    if change == ConfigChange::Untouched {
        return Ok(Some(
            "left as it was (it imported the drop-in before)".into(),
        ));
    }
    let mut doc = parse_config(path, &text)?;
    let Some(arr) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) else {
        return Ok(Some("no imports any more: left as it is".into()));
    };
    let before = arr.len();
    arr.retain(|v| v.as_str() != Some(import));
    if arr.len() == before {
        return Ok(Some("does not import the drop-in: left as it is".into()));
    }
    let empty = arr.is_empty();
    if empty && matches!(change, ConfigChange::KeyAdded | ConfigChange::Created) {
        doc.remove("imports");
    }
    rewrite_config(path, &doc)?;
    Ok(Some("the drop-in's import removed".into()))
}

/// Installs as `o` says; running it again updates the files and keeps the record.
pub fn install(o: &Options) -> Result<Report> {
    let dest = o.destdir.as_path();
    if !dest.is_dir() {
        return Err(Error::io(
            "install into",
            dest,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut record = load_record(dest)?.unwrap_or_default();
    let mut report = Report::default();
    record.import = abs(DROP_IN);

    let bin = std::fs::read(&o.binary).map_err(io("read", &o.binary))?;
    put(dest, BINARY, &bin, 0o755, &mut record, &mut report)?;
    put(
        dest,
        UNIT,
        unit(o).as_bytes(),
        0o644,
        &mut record,
        &mut report,
    )?;
    if o.lazy {
        put(
            dest,
            LAZY_UNIT,
            lazy_unit(o).as_bytes(),
            0o644,
            &mut record,
            &mut report,
        )?;
    } else if record.files.remove(LAZY_UNIT) {
        // An earlier `install --lazy` made it; this install is without.
        let p = dest.join(LAZY_UNIT);
        match std::fs::remove_file(&p) {
            Ok(()) => report.removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", p, e)),
        }
    }
    put(
        dest,
        DROP_IN,
        drop_in(&o.socket).as_bytes(),
        0o644,
        &mut record,
        &mut report,
    )?;

    make_parents(dest, CONTAINERD_CONFIG, &mut record)?;
    let cfg = dest.join(CONTAINERD_CONFIG);
    let change = add_import(&cfg, &record.import)?;
    // A re-install finds its own import: what the first install did stands.
    if record.containerd_config.is_none() || change != ConfigChange::Untouched {
        record.containerd_config = Some(change);
    }
    if change == ConfigChange::Created {
        record.files.insert(CONTAINERD_CONFIG.to_string());
    }
    report.containerd_config = Some(
        match change {
            ConfigChange::Created => "made, importing the drop-in",
            ConfigChange::KeyAdded => "imports added with the drop-in",
            ConfigChange::Appended => "the drop-in appended to its imports",
            ConfigChange::Untouched => "imports the drop-in already: untouched",
        }
        .to_string(),
    );

    make_parents(dest, RECORD, &mut record)?;
    if !dest.join(RECORD).exists() {
        record.files.insert(RECORD.to_string());
    }
    let json = serde_json::to_vec_pretty(&record).expect("a record serializes");
    write_atomic(&dest.join(RECORD), &json, 0o644)?;
    report.written.push(dest.join(RECORD));
    Ok(report)
}

/// Undoes what the install recorded.
pub fn uninstall(destdir: &Path) -> Result<Report> {
    let Some(record) = load_record(destdir)? else {
        return Err(Error::NotInstalled(destdir.join(RECORD)));
    };
    let mut report = Report::default();
    if let Some(change) = record.containerd_config {
        let cfg = destdir.join(CONTAINERD_CONFIG);
        report.containerd_config = remove_import(&cfg, &record.import, change)?;
    }
    // config.toml was handled above.
    for rel in [BINARY, UNIT, LAZY_UNIT, DROP_IN, RECORD] {
        let p = destdir.join(rel);
        if record.files.contains(rel) {
            match std::fs::remove_file(&p) {
                Ok(()) => report.removed.push(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", p, e)),
            }
        } else if p.exists() {
            report
                .kept
                .push((p, "was there before cstore install".to_string()));
        }
    }
    for d in record.dirs.iter().rev() {
        let p = destdir.join(d);
        // Only if empty: something else may have put files there since.
        match std::fs::remove_dir(&p) {
            Ok(()) => report.removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => report.kept.push((p, "not empty".to_string())),
        }
    }
    Ok(report)
}
