//! What a container's process is given (command, environment, working
//! directory, hostname) comes from an image config, which is hostile input,
//! and from flags. Each is checked here before anything is created: a NUL
//! byte or an empty variable name made libcontainer's init panic (and hang:
//! its unwinding ran into cstore's own destructors in the cloned child), a
//! NUL in an argument silently became an empty argument, and an overlong
//! hostname failed deep in the init with "failed to set hostname". The
//! messages name the entry, shortened; the caller names where it came from.

/// Linux's PATH_MAX: no path (the command, the working directory) is longer.
pub const PATH_MAX: usize = 4096;
/// Linux's HOST_NAME_MAX.
pub const HOST_NAME_MAX: usize = 64;

/// `s` quoted for a message, cut to a few dozen characters (an entry can be
/// megabytes long).
pub fn shown(s: &str) -> String {
    const KEEP: usize = 40;
    if s.len() <= KEEP {
        return format!("{s:?}");
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..end], s.len())
}

/// An environment entry: `NAME=VALUE`, the name non-empty, neither with a
/// NUL byte (as runc refuses them; the name cannot hold `=`, the first one
/// ends it).
pub fn env_entry(e: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("environment entry {}: {why}", shown(e)));
    let Some((name, value)) = e.split_once('=') else {
        return bad("no '=' (expected NAME=VALUE)");
    };
    if name.is_empty() {
        return bad("empty name");
    }
    if name.contains('\0') {
        return bad("NUL byte in the name");
    }
    if value.contains('\0') {
        return bad("NUL byte in the value");
    }
    Ok(())
}

/// The command: at least one word, the first a possible path, none with a
/// NUL byte (exec takes C strings).
pub fn args(args: &[String]) -> Result<(), String> {
    let Some(cmd) = args.first() else {
        return Err("no command".into());
    };
    if cmd.is_empty() {
        return Err("the command is an empty string".into());
    }
    if cmd.len() >= PATH_MAX {
        return Err(format!(
            "the command {} is longer than a path can be ({PATH_MAX} bytes)",
            shown(cmd)
        ));
    }
    for (i, a) in args.iter().enumerate() {
        if a.contains('\0') {
            return Err(format!(
                "argument {i} of the command ({}) has a NUL byte",
                shown(a)
            ));
        }
    }
    Ok(())
}

/// The working directory: absolute, a possible path, no NUL byte.
pub fn cwd(cwd: &str) -> Result<(), String> {
    let bad = |why: String| Err(format!("working directory {}: {why}", shown(cwd)));
    if !cwd.starts_with('/') {
        return bad("must be an absolute path".into());
    }
    if cwd.contains('\0') {
        return bad("has a NUL byte".into());
    }
    if cwd.len() >= PATH_MAX {
        return bad(format!("longer than a path can be ({PATH_MAX} bytes)"));
    }
    Ok(())
}

/// The hostname: what sethostname(2) takes.
pub fn hostname(h: &str) -> Result<(), String> {
    if h.len() > HOST_NAME_MAX {
        return Err(format!(
            "hostname {}: longer than {HOST_NAME_MAX} bytes",
            shown(h)
        ));
    }
    if h.contains('\0') {
        return Err(format!("hostname {}: has a NUL byte", shown(h)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_entries() {
        for ok in ["A=b", "A=", "A==b", "PATH=/bin:/usr/bin", "é=ü"] {
            env_entry(ok).unwrap();
        }
        for (e, why) in [
            ("=x", "environment entry \"=x\": empty name"),
            ("=", "empty name"),
            ("NAME", "environment entry \"NAME\": no '='"),
            ("", "no '='"),
            ("A\0B=x", "NUL byte in the name"),
            ("A=x\0y", "NUL byte in the value"),
        ] {
            let err = env_entry(e).unwrap_err();
            assert!(err.contains(why), "{e:?}: {err}");
        }
        let long = format!("=x{}", "y".repeat(1 << 20));
        let err = env_entry(&long).unwrap_err();
        assert!(err.len() < 200 && err.contains("(1048578 bytes)"), "{err}");
    }

    #[test]
    fn commands() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        args(&v(&["sh", "-c", ""])).unwrap();
        for (a, why) in [
            (v(&[]), "no command".to_string()),
            (v(&[""]), "the command is an empty string".into()),
            (
                v(&["echo", "a\0b"]),
                "argument 1 of the command (\"a\\0b\") has a NUL byte".into(),
            ),
            (v(&["e\0cho"]), "argument 0".into()),
            (
                vec!["x".repeat(PATH_MAX)],
                "longer than a path can be".into(),
            ),
        ] {
            let err = args(&a).unwrap_err();
            assert!(err.contains(&why), "{a:?}: {err}");
        }
    }

    #[test]
    fn working_directories_and_hostnames() {
        cwd("/srv/app").unwrap();
        assert!(cwd("rel").unwrap_err().contains("absolute"));
        assert!(cwd("/a\0b").unwrap_err().contains("NUL"));
        assert!(cwd(&format!("/{}", "d/".repeat(2048)))
            .unwrap_err()
            .contains("longer than a path"));
        hostname("").unwrap();
        hostname(&"h".repeat(64)).unwrap();
        assert!(hostname(&"h".repeat(65))
            .unwrap_err()
            .contains("longer than 64 bytes"));
        assert!(hostname("a\0").unwrap_err().contains("NUL"));
    }

    #[test]
    fn shown_cuts_on_a_character_boundary() {
        assert_eq!(shown("abc"), "\"abc\"");
        let s = "é".repeat(30);
        assert_eq!(shown(&s), format!("{:?}... (60 bytes)", "é".repeat(20)));
    }
}
