//! docker's rules for a container's process: the image config's
//! `Entrypoint`, `Cmd`, `Env`, `WorkingDir` and `User` merged with what the
//! caller gives (`docker run`'s flags), every entry checked (see
//! `validate`) and named by where it came from before anything is made.
//!
//! The image config is hostile input. It reaches this module as bytes the
//! store has already read under its one limit (`MAX_CONFIG_BYTES` in
//! cstore-store, which every reader of a config goes through); this is the
//! one place that parses its `config` part.

use crate::validate;
use crate::Error;

/// docker's PATH for an image whose config has no `Env`.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The part of an image config (`.config`) a container's process comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// The `config` of an image config document (none is an empty one);
    /// `image` names it in errors.
    pub fn parse(bytes: &[u8], image: &str) -> Result<ImageConfig, Error> {
        #[derive(serde::Deserialize)]
        struct Document {
            config: Option<ImageConfig>,
        }
        serde_json::from_slice::<Document>(bytes)
            .map(|d| d.config.unwrap_or_default())
            .map_err(|e| Error::ImageConfig {
                image: image.to_string(),
                reason: e.to_string(),
            })
    }
}

/// What the caller asks for instead of the image's defaults (`docker run`'s
/// `--entrypoint`, trailing command, `-e`, `-w`, `-u`, `--hostname`).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `Some("")` removes the image's entrypoint.
    pub entrypoint: Option<String>,
    /// Empty: the image's cmd (unless `entrypoint` is given).
    pub command: Vec<String>,
    /// `KEY=VALUE` entries, each replacing the image's entry for KEY.
    pub env: Vec<String>,
    /// `Some("")` is none (the image's).
    pub workdir: Option<String>,
    /// `USER[:GROUP]`; `Some("")` is none (the image's).
    pub user: Option<String>,
    pub hostname: Option<String>,
}

/// A container's process as docker would start it, before the rootfs is
/// there: the user is still a name (resolved from the rootfs' /etc/passwd
/// by `user::resolve`), and HOME is added once it is known (`with_home`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Absolute and cleaned.
    pub cwd: String,
    /// `USER[:GROUP]` or "" (root).
    pub user: String,
    pub hostname: Option<String>,
}

impl Process {
    /// Merge `config` of image `image` with `o` as docker does; every entry
    /// checked, an error saying where a bad one came from.
    pub fn merge(image: &str, config: &ImageConfig, o: &Overrides) -> Result<Process, Error> {
        let input = |m: String| Error::Input(m);
        // --entrypoint replaces the image's ("" removes it) and drops the
        // image's cmd with it; a command replaces the cmd.
        let mut args: Vec<String> = match &o.entrypoint {
            Some(e) if e.is_empty() => vec![],
            Some(e) => vec![e.clone()],
            None => config.entrypoint.clone().unwrap_or_default(),
        };
        if !o.command.is_empty() {
            args.extend(o.command.iter().cloned());
        } else if o.entrypoint.is_none() {
            args.extend(config.cmd.clone().unwrap_or_default());
        }
        if args.is_empty() {
            return Err(input(format!(
                "{image}: no command given and the image has no entrypoint or cmd"
            )));
        }
        validate::args(&args).map_err(|e| {
            let from = if o.command.is_empty() && o.entrypoint.is_none() {
                "its Entrypoint and Cmd"
            } else {
                "the command given"
            };
            input(format!("image {image}: {e} (from {from})"))
        })?;

        // An empty -u is no -u (the image's user).
        let user = o
            .user
            .clone()
            .filter(|u| !u.is_empty())
            .or(config.user.clone())
            .unwrap_or_default();
        // Absolute (made in the rootfs if missing, at start); -w "" is no -w.
        let cwd = o
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .or(config.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        validate::cwd(&cwd).map_err(|e| match &o.workdir {
            Some(w) if !w.is_empty() => input(format!("-w: {e}")),
            _ => input(format!("image {image}: {e} (its WorkingDir)")),
        })?;
        let cwd = crate::rootfs::clean_absolute(&cwd);

        let mut env = config
            .env
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_PATH.into()]);
        for e in &env {
            validate::env_entry(e).map_err(|e| input(format!("image {image}: {e} (its Env)")))?;
        }
        for e in &o.env {
            validate::env_entry(e).map_err(|e| input(format!("-e: {e}")))?;
            let key = e.split('=').next().unwrap_or("");
            env.retain(|x| x.split('=').next() != Some(key));
            env.push(e.clone());
        }
        if let Some(h) = &o.hostname {
            validate::hostname(h).map_err(|e| input(format!("--hostname: {e}")))?;
        }
        Ok(Process {
            args,
            env,
            cwd,
            user,
            hostname: o.hostname.clone(),
        })
    }

    /// HOME from the user's passwd entry unless the environment sets it (as
    /// runc does in the container for docker).
    pub fn with_home(&mut self, home: &str) {
        if !self.env.iter().any(|e| e.starts_with("HOME=")) {
            self.env.push(format!("HOME={home}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn config() -> ImageConfig {
        ImageConfig {
            entrypoint: Some(v(&["/entry", "-x"])),
            cmd: Some(v(&["serve", "--port", "80"])),
            env: Some(v(&["PATH=/bin", "A=image", "B=image"])),
            working_dir: Some("/srv/app/../www".into()),
            user: Some("web:web".into()),
        }
    }

    fn merge(c: &ImageConfig, o: Overrides) -> Result<Process, String> {
        Process::merge("img", c, &o).map_err(|e| e.to_string())
    }

    // docker run reference, "ENTRYPOINT (default command to execute at
    // runtime)" and "CMD (default command or options)": the command given
    // replaces CMD and is appended to ENTRYPOINT; --entrypoint replaces
    // ENTRYPOINT and clears CMD; --entrypoint "" resets it to nothing.
    #[test]
    fn command_follows_dockers_entrypoint_and_cmd_rules() {
        let c = config();
        let args = |o: Overrides| merge(&c, o).unwrap().args;
        assert_eq!(
            args(Overrides::default()),
            v(&["/entry", "-x", "serve", "--port", "80"]),
            "no flags: ENTRYPOINT then CMD"
        );
        assert_eq!(
            args(Overrides {
                command: v(&["other", "arg"]),
                ..Default::default()
            }),
            v(&["/entry", "-x", "other", "arg"]),
            "a command replaces CMD, keeps ENTRYPOINT"
        );
        assert_eq!(
            args(Overrides {
                entrypoint: Some("/bin/sh".into()),
                ..Default::default()
            }),
            v(&["/bin/sh"]),
            "--entrypoint clears CMD"
        );
        assert_eq!(
            args(Overrides {
                entrypoint: Some("/bin/sh".into()),
                command: v(&["-c", "true"]),
                ..Default::default()
            }),
            v(&["/bin/sh", "-c", "true"]),
            "--entrypoint plus a command"
        );
        assert_eq!(
            args(Overrides {
                entrypoint: Some("".into()),
                command: v(&["ls"]),
                ..Default::default()
            }),
            v(&["ls"]),
            "--entrypoint \"\" removes ENTRYPOINT"
        );
        let only_cmd = ImageConfig {
            entrypoint: None,
            ..config()
        };
        assert_eq!(
            merge(&only_cmd, Overrides::default()).unwrap().args,
            v(&["serve", "--port", "80"])
        );
        // Nothing to run at all: an error naming the image.
        let e = merge(
            &c,
            Overrides {
                entrypoint: Some("".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("img") && e.contains("no command given"), "{e}");
        let e = merge(&ImageConfig::default(), Overrides::default()).unwrap_err();
        assert!(e.contains("no entrypoint or cmd"), "{e}");
    }

    // docker run reference, "ENV (environment variables)": -e overrides the
    // image's variable of the same name, others are added; docker's PATH
    // when the image sets no Env.
    #[test]
    fn env_overrides_by_name_and_defaults_path() {
        let p = merge(
            &config(),
            Overrides {
                env: v(&["B=flag", "C=flag", "A=flag=with=equals"]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            p.env,
            v(&["PATH=/bin", "B=flag", "C=flag", "A=flag=with=equals"])
        );
        let p = merge(
            &ImageConfig::default(),
            Overrides {
                command: v(&["true"]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.env, v(&[DEFAULT_PATH]));

        let mut p = merge(&config(), Overrides::default()).unwrap();
        p.with_home("/home/web");
        assert!(p.env.contains(&"HOME=/home/web".to_string()));
        let mut p = merge(
            &config(),
            Overrides {
                env: v(&["HOME=/mine"]),
                ..Default::default()
            },
        )
        .unwrap();
        p.with_home("/home/web");
        assert_eq!(
            p.env.iter().filter(|e| e.starts_with("HOME=")).count(),
            1,
            "a HOME given is kept: {:?}",
            p.env
        );
        assert!(p.env.contains(&"HOME=/mine".to_string()));
    }

    // docker run reference, "WORKDIR" and "USER": -w and -u replace the
    // image's; an empty flag is no flag; the default directory is /.
    #[test]
    fn workdir_and_user_replace_the_images() {
        let p = merge(&config(), Overrides::default()).unwrap();
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/srv/www", "web:web"));
        let p = merge(
            &config(),
            Overrides {
                workdir: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/tmp", "1000:1000"));
        let p = merge(
            &config(),
            Overrides {
                workdir: Some("".into()),
                user: Some("".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/srv/www", "web:web"));
        let bare = ImageConfig {
            cmd: Some(v(&["true"])),
            ..Default::default()
        };
        let p = merge(&bare, Overrides::default()).unwrap();
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", ""));
    }

    // Every bad entry is refused before anything is made, the message
    // saying whether the image or a flag gave it.
    #[test]
    fn bad_entries_name_where_they_came_from() {
        let cases: Vec<(ImageConfig, Overrides, &[&str])> = vec![
            (
                ImageConfig {
                    cmd: Some(v(&["a\0b"])),
                    ..Default::default()
                },
                Overrides::default(),
                &["image img", "from its Entrypoint and Cmd"],
            ),
            (
                config(),
                Overrides {
                    command: v(&["ok", "x\0y"]),
                    ..Default::default()
                },
                &["image img", "the command given"],
            ),
            (
                ImageConfig {
                    working_dir: Some("relative".into()),
                    ..config()
                },
                Overrides::default(),
                &["image img", "its WorkingDir"],
            ),
            (
                config(),
                Overrides {
                    workdir: Some("relative".into()),
                    ..Default::default()
                },
                &["-w:", "absolute"],
            ),
            (
                ImageConfig {
                    env: Some(v(&["=x"])),
                    ..config()
                },
                Overrides::default(),
                &["image img", "its Env", "empty name"],
            ),
            (
                config(),
                Overrides {
                    env: v(&["NOEQUALS"]),
                    ..Default::default()
                },
                &["-e:", "no '='"],
            ),
            (
                config(),
                Overrides {
                    hostname: Some("h".repeat(65)),
                    ..Default::default()
                },
                &["--hostname:", "longer than 64"],
            ),
        ];
        for (c, o, want) in cases {
            let e = merge(&c, o).unwrap_err();
            for w in want {
                assert!(e.contains(w), "{e:?} should say {w:?}");
            }
        }
    }

    #[test]
    fn config_parse_takes_the_config_part_and_names_the_image() {
        let c = ImageConfig::parse(
            br#"{"architecture":"amd64","config":{"Cmd":["sh"],"WorkingDir":"/w","Unknown":1},"rootfs":{}}"#,
            "img",
        )
        .unwrap();
        assert_eq!(c.cmd, Some(v(&["sh"])));
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(
            ImageConfig::parse(b"{}", "img").unwrap(),
            ImageConfig::default()
        );
        let e = ImageConfig::parse(br#"{"config":{"Cmd":"sh"}}"#, "img")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config of img"), "{e}");
    }
}
