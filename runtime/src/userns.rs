//! `run --userns`: the container in a user namespace of its own, its ids
//! 0..COUNT mapped to host ids BASE.. (rootless-style), so its root is an
//! unprivileged user on the host. The mapping comes from the flag or from
//! root's entries in /etc/subuid and /etc/subgid. The image's layers are
//! id-mapped mounts through a user namespace with the same mapping (see
//! `cstore_snapshotter::mount::mount_idmapped`); `Userns::fd` makes one.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::Error;

/// The default when /etc/subuid has no entry for root (docker's and
/// podman's first subordinate range).
pub const DEFAULT_BASE: u32 = 100_000;
pub const DEFAULT_COUNT: u32 = 65_536;

/// Container ids 0..count are host ids host..host+count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub host: u32,
    pub count: u32,
}

impl IdRange {
    fn new(host: u32, count: u32, value: &str) -> Result<IdRange, Error> {
        let bad = |reason: &str| Error::InvalidUserns {
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if host == 0 {
            return Err(bad(
                "base 0 would make the container's root the host's root",
            ));
        }
        if count == 0 {
            return Err(bad("count must be at least 1"));
        }
        // 4294967295 is no id at all ((uid_t)-1: "unchanged" to setresuid,
        // "no owner" to chown): a range may end just below it.
        if host
            .checked_add(count - 1)
            .is_none_or(|last| last == u32::MAX)
        {
            return Err(bad("range reaches 4294967295, which is not an id"));
        }
        Ok(IdRange { host, count })
    }

    /// The host id of container id `id`, if mapped (never overflows: `new`
    /// keeps host + count - 1 below u32::MAX).
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.count).then(|| self.host + id)
    }
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "container ids 0-{} are host ids {}-{}",
            self.count - 1,
            self.host,
            self.host + (self.count - 1)
        )
    }
}

/// The mapping of a container's user namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Userns {
    pub uid: IdRange,
    pub gid: IdRange,
}

impl Userns {
    /// `--userns VALUE`: `host` (None: no user namespace), `auto` (root's
    /// /etc/subuid and /etc/subgid entries, else 100000:65536) or BASE:COUNT.
    pub fn parse(value: &str) -> Result<Option<Userns>, Error> {
        Self::parse_with(value, Path::new("/etc/subuid"), Path::new("/etc/subgid"))
    }

    fn parse_with(value: &str, subuid: &Path, subgid: &Path) -> Result<Option<Userns>, Error> {
        match value {
            "host" => Ok(None),
            "auto" | "" => {
                let uid = sub_range(subuid)?;
                let gid = sub_range(subgid)?;
                let default = || IdRange {
                    host: DEFAULT_BASE,
                    count: DEFAULT_COUNT,
                };
                Ok(Some(Userns {
                    uid: uid.unwrap_or_else(default),
                    gid: gid.unwrap_or_else(default),
                }))
            }
            v => {
                let bad = |reason: &str| Error::InvalidUserns {
                    value: v.to_string(),
                    reason: reason.to_string(),
                };
                let (b, c) = v.split_once(':').ok_or_else(|| bad("unknown mode"))?;
                let base = b.parse::<u32>().map_err(|_| bad("BASE is not a number"))?;
                let count = c.parse::<u32>().map_err(|_| bad("COUNT is not a number"))?;
                let r = IdRange::new(base, count, v)?;
                Ok(Some(Userns { uid: r, gid: r }))
            }
        }
    }

    /// Refuse a process user whose ids this namespace does not map (the
    /// kernel would refuse them at setresuid/setgroups, deep in the
    /// container's init; `spec` is the user as asked for, for the message).
    pub fn check_user(&self, spec: &str, u: &crate::user::ExecUser) -> Result<(), Error> {
        let unmapped = |what: &str, id: u32, r: &IdRange| Error::User {
            user: spec.to_string(),
            reason: format!("{what} {id} is not mapped in the container's user namespace ({r})"),
        };
        if self.uid.to_host(u.uid).is_none() {
            return Err(unmapped("uid", u.uid, &self.uid));
        }
        for &g in std::iter::once(&u.gid).chain(&u.additional_gids) {
            if self.gid.to_host(g).is_none() {
                return Err(unmapped("gid", g, &self.gid));
            }
        }
        Ok(())
    }

    /// A user namespace with this mapping, held by its fd (for
    /// mount_setattr's MOUNT_ATTR_IDMAP). A child is cloned into a new user
    /// namespace, its maps written, its namespace opened, and it is killed:
    /// the namespace lives on through the fd.
    pub fn fd(&self) -> Result<OwnedFd, Error> {
        self.make_fd().map_err(Error::UsernsCreate)
    }

    fn make_fd(&self) -> io::Result<OwnedFd> {
        let mut stack = vec![0u8; 64 << 10];
        // SAFETY: the child runs only pause(2) on its own stack and is killed.
        let pid = unsafe {
            nix::sched::clone(
                Box::new(|| loop {
                    libc::pause();
                }),
                &mut stack,
                CloneFlags::CLONE_NEWUSER,
                Some(libc::SIGCHLD),
            )
        }?;
        let result = (|| {
            let map = |r: &IdRange| format!("0 {} {}\n", r.host, r.count);
            std::fs::write(format!("/proc/{pid}/uid_map"), map(&self.uid))?;
            std::fs::write(format!("/proc/{pid}/gid_map"), map(&self.gid))?;
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
            Ok(OwnedFd::from(ns))
        })();
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(pid, None) {}
        result
    }
}

/// Root's range in a /etc/subuid-style file ("root:100000:65536" or
/// "0:..."); None if the file or the entry is absent.
fn sub_range(path: &Path) -> Result<Option<IdRange>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::SubIds {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    for line in text.lines().map(str::trim) {
        let mut f = line.split(':');
        let (Some(name), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if name != "root" && name != "0" {
            continue;
        }
        let err = |message: String| Error::SubIds {
            path: path.display().to_string(),
            message,
        };
        let (start, count) = match (start.parse::<u32>(), count.parse::<u32>()) {
            (Ok(s), Ok(c)) => (s, c),
            _ => return Err(err(format!("bad entry {line:?}"))),
        };
        return IdRange::new(start, count, line)
            .map(Some)
            .map_err(|e| err(format!("entry {line:?}: {e}")));
    }
    Ok(None)
}

/// Can host uid/gid `ids` search directory `dir`? (The container's root
/// must walk to its rootfs by path after entering its user namespace,
/// where it has no privilege over host-owned directories.)
pub fn searchable_by(dir: &Path, ids: (u32, u32)) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    let bit = if m.uid() == ids.0 {
        0o100
    } else if m.gid() == ids.1 {
        0o010
    } else {
        0o001
    };
    Ok(m.mode() & bit != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(uid: &str, gid: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (u, g) = (d.path().join("subuid"), d.path().join("subgid"));
        std::fs::write(&u, uid).unwrap();
        std::fs::write(&g, gid).unwrap();
        (d, u, g)
    }

    #[test]
    fn values() {
        let (_d, u, g) = files("alice:200000:65536\nroot:300000:1000\n", "0:400000:70000\n");
        let r = Userns::parse_with("auto", &u, &g).unwrap().unwrap();
        assert_eq!(
            r.uid,
            IdRange {
                host: 300000,
                count: 1000
            }
        );
        assert_eq!(
            r.gid,
            IdRange {
                host: 400000,
                count: 70000
            }
        );
        assert_eq!(r.uid.to_host(0), Some(300000));
        assert_eq!(r.uid.to_host(1000), None);

        let (_d, u, g) = files("alice:200000:65536\n", "");
        let r = Userns::parse_with("auto", &u, &g).unwrap().unwrap();
        assert_eq!(
            r.uid,
            IdRange {
                host: DEFAULT_BASE,
                count: DEFAULT_COUNT
            }
        );
        assert_eq!(r.gid, r.uid);

        assert_eq!(Userns::parse_with("host", &u, &g).unwrap(), None);
        let r = Userns::parse_with("500000:10", &u, &g).unwrap().unwrap();
        assert_eq!(
            r.gid,
            IdRange {
                host: 500000,
                count: 10
            }
        );
    }

    #[test]
    fn bad_values_say_why() {
        let (_d, u, g) = files("", "");
        for (v, why) in [
            ("sometimes", "unknown mode"),
            ("x:10", "BASE is not a number"),
            ("100000:lots", "COUNT is not a number"),
            ("0:65536", "base 0"),
            ("100000:0", "at least 1"),
            ("4294967295:2", "not an id"),
            ("4294967294:2", "not an id"),
            ("4294967295:1", "not an id"),
            ("2:4294967294", "not an id"),
        ] {
            let e = Userns::parse_with(v, &u, &g).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(v), "{v}: {e}");
        }
        // The largest range there is: up to 4294967294.
        let r = Userns::parse_with("1:4294967294", &u, &g).unwrap().unwrap();
        assert_eq!(r.uid.to_host(4294967293), Some(4294967294));
        assert_eq!(r.uid.to_host(4294967294), None);
        let (_d, u, g) = files("root:abc:1\n", "");
        let e = Userns::parse_with("auto", &u, &g).unwrap_err().to_string();
        assert!(e.contains("subuid") && e.contains("root:abc:1"), "{e}");
    }

    #[test]
    fn a_user_outside_the_mapping_is_refused_by_name() {
        let ns = Userns {
            uid: IdRange {
                host: 100000,
                count: 65536,
            },
            gid: IdRange {
                host: 200000,
                count: 1000,
            },
        };
        let user = |uid, gid, gids: &[u32]| crate::user::ExecUser {
            uid,
            gid,
            additional_gids: gids.to_vec(),
            home: "/".into(),
        };
        ns.check_user("app", &user(65535, 999, &[999, 0])).unwrap();
        for (u, want) in [
            (
                user(65536, 0, &[0]),
                "uid 65536 is not mapped in the container's user namespace (container ids 0-65535 are host ids 100000-165535)",
            ),
            (
                user(1, 1000, &[1000]),
                "gid 1000 is not mapped in the container's user namespace (container ids 0-999 are host ids 200000-200999)",
            ),
            (user(1, 1, &[1, 5000]), "gid 5000 is not mapped"),
        ] {
            let e = ns.check_user("app", &u).unwrap_err().to_string();
            assert!(e.starts_with("user \"app\": ") && e.contains(want), "{e}");
        }
    }
}
