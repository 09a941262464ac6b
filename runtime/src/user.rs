//! Who a container's process runs as: docker's `-u` / the image config's
//! `User` (`user`, `uid`, `user:group`, `uid:gid`, any mix) resolved against
//! the container's own /etc/passwd and /etc/group, as runc's `GetExecUser`
//! does for docker: a name must be in the file, a number need not be; the
//! user's primary gid when no group is given, and then the groups that list
//! the user as supplementary ones; HOME from passwd (else "/").

use std::path::Path;

use crate::Error;

/// The process's credentials and home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid first (as docker: the
    /// process never keeps the groups of whoever started it).
    pub additional_gids: Vec<u32>,
    pub home: String,
}

/// runc's bound: ids above it are -1 in some ABIs.
const MAX_ID: u32 = i32::MAX as u32;
/// More than any real passwd or group file; a bigger one is refused, not read.
const MAX_FILE: u64 = 16 << 20;

/// Resolve `spec` ("" is root) against the files under `rootfs`, which are
/// read as the container will see them: symlinks resolved inside `rootfs`,
/// never out of it.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<ExecUser, Error> {
    let err = |reason: String| Error::User {
        user: spec.to_string(),
        reason,
    };
    let passwd = crate::rootfs::read_file(rootfs, "etc/passwd", MAX_FILE).map_err(err)?;
    let group = crate::rootfs::read_file(rootfs, "etc/group", MAX_FILE).map_err(err)?;
    resolve_in(spec, passwd.as_deref(), group.as_deref()).map_err(err)
}

struct PasswdEntry<'a> {
    name: &'a str,
    /// The id fields as written: range-checked once an entry is chosen
    /// (as runc's GetExecUser does), so a bad one is refused, not skipped
    /// or taken for -1.
    uid: &'a str,
    gid: &'a str,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: &'a str,
    members: Vec<&'a str>,
}

/// `name:password:uid:gid:gecos:home:shell` lines; others (comments, NIS
/// `+` entries, junk) are skipped.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        Some(PasswdEntry {
            name: f.first().filter(|n| !n.is_empty())?,
            uid: f.get(2)?,
            gid: f.get(3)?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// `name:password:gid:member,member` lines.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        Some(GroupEntry {
            name: f.first().filter(|n| !n.is_empty())?,
            gid: f.get(2)?,
            members: f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

/// An id as written (digits only: no sign, no spaces), whatever its range.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn numeric(what: &str, s: &str) -> Result<Option<u32>, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_ID => Ok(Some(n)),
        _ => Err(format!("{what} {s} is out of range (0-{MAX_ID})")),
    }
}

/// An id read from one of the image's files: the same range as a number
/// given on the command line. Above it, the kernel takes 4294967295 for
/// "unchanged" (setresuid(-1) keeps root) and other ABIs see negative ids.
fn file_id(what: &str, raw: &str, owner: &str, file: &str) -> Result<u32, String> {
    match digits(raw) {
        Some(n) if n <= MAX_ID as u64 => Ok(n as u32),
        Some(_) => Err(format!(
            "{what} {raw} of {owner:?} in the image's {file} is out of range (0-{MAX_ID})"
        )),
        None => Err(format!(
            "{what} {raw:?} of {owner:?} in the image's {file} is not a number"
        )),
    }
}

/// The resolution itself, on the files' contents (None: no such file).
fn resolve_in(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ExecUser, String> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((_, g)) if g.contains(':') => {
            return Err("expected USER[:GROUP] (a name or a number each)".into())
        }
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (spec, None),
    };
    let uid_arg = numeric("uid", user_arg)?;
    // A number is always a uid (even if some user is named so), a name must
    // exist. A line whose uid is not a number matches no number.
    let entry = passwd.and_then(|p| {
        passwd_entries(p).find(|e| match uid_arg {
            _ if user_arg.is_empty() => digits(e.uid) == Some(0),
            Some(uid) => digits(e.uid) == Some(uid as u64),
            None => e.name == user_arg,
        })
    });
    let mut user = match (&entry, uid_arg) {
        (Some(e), _) => ExecUser {
            uid: file_id("uid", e.uid, e.name, "/etc/passwd")?,
            gid: file_id("gid", e.gid, e.name, "/etc/passwd")?,
            additional_gids: vec![],
            home: e.home.to_string(),
        },
        (None, Some(uid)) => ExecUser {
            uid,
            gid: 0,
            additional_gids: vec![],
            home: "/".into(),
        },
        (None, None) if user_arg.is_empty() => ExecUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/".into(),
        },
        (None, None) => {
            return Err(match passwd {
                Some(_) => "no such user in the image's /etc/passwd".into(),
                None => "a user name, and the image has no /etc/passwd".into(),
            })
        }
    };
    if user.home.is_empty() {
        user.home = "/".into();
    }
    let groups: Vec<GroupEntry> = group
        .map(|g| group_entries(g).collect())
        .unwrap_or_default();
    let mut sgids = vec![];
    match group_arg {
        Some(g) => {
            let gid_arg = numeric("gid", g)?;
            user.gid = match groups.iter().find(|e| match gid_arg {
                Some(gid) => digits(e.gid) == Some(gid as u64),
                None => e.name == g,
            }) {
                Some(e) => file_id("gid", e.gid, e.name, "/etc/group")?,
                None => gid_arg.ok_or_else(|| match group {
                    Some(_) => format!("no group {g:?} in the image's /etc/group"),
                    None => format!("group name {g:?}, and the image has no /etc/group"),
                })?,
            };
        }
        // Only a user found by name in passwd has groups listing it.
        None => {
            if let Some(e) = &entry {
                for g in groups.iter().filter(|g| g.members.contains(&e.name)) {
                    sgids.push(file_id("gid", g.gid, g.name, "/etc/group")?);
                }
            }
        }
    }
    user.additional_gids.push(user.gid);
    for g in sgids {
        if !user.additional_gids.contains(&g) {
            user.additional_gids.push(g);
        }
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
# a comment
app:x:1000:1000:App:/home/app:/bin/sh
svc:x:1001:1000::/srv:/bin/false
nohome:x:1002:1002::
+::::::
broken:x:notanumber:1:::
2000:x:3000:3000::/numeric-name:/bin/sh
";
    const GROUP: &str = "root:x:0:
wheel:x:10:root,app
app:x:1000:
audio:x:29:app, svc
staff:x:50:
nohome:x:1002:
";

    fn r(spec: &str) -> Result<ExecUser, String> {
        resolve_in(spec, Some(PASSWD), Some(GROUP))
    }

    fn u(uid: u32, gid: u32, gids: &[u32], home: &str) -> ExecUser {
        ExecUser {
            uid,
            gid,
            additional_gids: gids.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        assert_eq!(r(""), Ok(u(0, 0, &[0, 10], "/root")));
        assert_eq!(r("root"), Ok(u(0, 0, &[0, 10], "/root")));
        // By name: the primary group, then the groups listing the user.
        assert_eq!(r("app"), Ok(u(1000, 1000, &[1000, 10, 29], "/home/app")));
        // A number in passwd is that user, with its groups.
        assert_eq!(r("1000"), Ok(u(1000, 1000, &[1000, 10, 29], "/home/app")));
        // A number is never a name; one in no file runs as gid 0, home /.
        assert_eq!(r("2000"), Ok(u(2000, 0, &[0], "/")));
        assert_eq!(r("4242"), Ok(u(4242, 0, &[0], "/")));
        // An explicit group replaces the primary one and all supplementary ones.
        assert_eq!(r("app:staff"), Ok(u(1000, 50, &[50], "/home/app")));
        assert_eq!(r("app:77"), Ok(u(1000, 77, &[77], "/home/app")));
        assert_eq!(r("1000:1000"), Ok(u(1000, 1000, &[1000], "/home/app")));
        assert_eq!(r("4242:audio"), Ok(u(4242, 29, &[29], "/")));
        assert_eq!(r("svc"), Ok(u(1001, 1000, &[1000, 29], "/srv")));
        assert_eq!(r("nohome"), Ok(u(1002, 1002, &[1002], "/")));
        assert_eq!(r("app:"), r("app"));
    }

    #[test]
    fn unknown_names_and_bad_specs_are_refused() {
        assert_eq!(
            r("bob"),
            Err("no such user in the image's /etc/passwd".into())
        );
        assert_eq!(
            r("broken"),
            Err(
                "uid \"notanumber\" of \"broken\" in the image's /etc/passwd is not a number"
                    .into()
            )
        );
        assert_eq!(
            r("app:nogroup"),
            Err("no group \"nogroup\" in the image's /etc/group".into())
        );
        assert!(r("a:b:c").unwrap_err().contains("USER[:GROUP]"));
        assert!(r("4294967295").unwrap_err().contains("out of range"));
        assert!(r("1:2147483648").unwrap_err().contains("out of range"));
    }

    /// Issue 12, finding 5: ids read from the files get the range check
    /// ids given as numbers get. 4294967295 is -1 to setresuid, which then
    /// changes nothing: the process stayed root.
    #[test]
    fn ids_from_the_files_are_range_checked_as_numbers_given_are() {
        const P: &str = "root:x:0:0::/root:/bin/sh
app:x:4294967295:1000::/home/app:/bin/sh
big:x:2147483648:1::/:/bin/sh
gbad:x:1001:4294967295::/:/bin/sh
huge:x:99999999999999999999999:1::/:/bin/sh
signed:x:+5:1::/:/bin/sh
ok:x:1002:1002::/:/bin/sh
";
        const G: &str = "ok:x:1002:
minus:x:4294967295:ok
named:x:3000000000:
";
        let r = |spec: &str| resolve_in(spec, Some(P), Some(G));
        let range = |what: &str, raw: &str, owner: &str, file: &str| {
            Err(format!(
                "{what} {raw} of {owner:?} in the image's {file} is out of range (0-2147483647)"
            ))
        };
        assert_eq!(r("app"), range("uid", "4294967295", "app", "/etc/passwd"));
        assert_eq!(r("big"), range("uid", "2147483648", "big", "/etc/passwd"));
        assert_eq!(r("gbad"), range("gid", "4294967295", "gbad", "/etc/passwd"));
        assert_eq!(
            r("huge"),
            Err("uid \"99999999999999999999999\" of \"huge\" in the image's /etc/passwd is not a number".into())
        );
        assert_eq!(
            r("signed"),
            Err("uid \"+5\" of \"signed\" in the image's /etc/passwd is not a number".into())
        );
        // A supplementary group listing the user, a group given by name.
        assert_eq!(r("ok"), range("gid", "4294967295", "minus", "/etc/group"));
        assert_eq!(
            r("ok:named"),
            range("gid", "3000000000", "named", "/etc/group")
        );
        // Numbers match only lines whose id is a number in range.
        assert_eq!(r("5"), Ok(u(5, 0, &[0], "/")));
        assert!(r("4294967295").unwrap_err().contains("out of range"));
        assert_eq!(r("ok:1002"), Ok(u(1002, 1002, &[1002], "/")));
    }

    #[test]
    fn without_the_files_only_numbers_work() {
        assert_eq!(resolve_in("", None, None), Ok(u(0, 0, &[0], "/")));
        assert_eq!(resolve_in("7:8", None, None), Ok(u(7, 8, &[8], "/")));
        assert_eq!(
            resolve_in("app", None, None),
            Err("a user name, and the image has no /etc/passwd".into())
        );
        assert_eq!(
            resolve_in("7:wheel", Some(PASSWD), None),
            Err("group name \"wheel\", and the image has no /etc/group".into())
        );
    }

    #[test]
    fn the_files_are_the_rootfs_ones() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(root.path().join("lib")).unwrap();
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(root.path().join("lib/passwd"), "app:x:5:6::/h:/bin/sh\n").unwrap();
        std::fs::write(etc.join("group"), "g:x:7:app\n").unwrap();
        // Absolute: the container's /lib/passwd (rootfs::read_file's tests
        // have the rest).
        std::os::unix::fs::symlink("/lib/passwd", etc.join("passwd")).unwrap();
        assert_eq!(resolve(root.path(), "app").unwrap(), u(5, 6, &[6, 7], "/h"));
        let e = resolve(root.path(), "bob").unwrap_err().to_string();
        assert_eq!(e, "user \"bob\": no such user in the image's /etc/passwd");
        std::fs::remove_file(root.path().join("lib/passwd")).unwrap();
        std::fs::create_dir(root.path().join("lib/passwd")).unwrap();
        let e = resolve(root.path(), "app").unwrap_err().to_string();
        assert!(
            e.contains("/etc/passwd in") && e.contains("not a regular file"),
            "{e}"
        );
    }
}
