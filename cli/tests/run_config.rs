//! `cstore run` and the image config: Entrypoint, Cmd, Env, WorkingDir and
//! User used when no flags are given, flags overriding them as docker's do,
//! and users and groups by name from the container's own /etc/passwd and
//! /etc/group (fixtures/run-images.sh's run-config image, whose /etc/group is
//! an absolute symlink inside it), or by number (the busybox test image).

use crate::harness::containers::run_images_registry;
use crate::harness::{pulled, Cstore};

fn setup(repo_tag: &str) -> (Cstore, String) {
    pulled(run_images_registry(), repo_tag)
}

#[test]
fn the_image_config_is_used_when_no_flags_are_given() {
    let (cs, image) = setup("run-config:latest");
    // Entrypoint [show] + Cmd [from-cmd], as user app (1000, primary group
    // 1000, listed in wheel and staff), in /srv/app, with the image's Env and
    // HOME from passwd.
    assert_eq!(
        cs.run_lines(&[&image]),
        [
            "args from-cmd",
            "ids 1000 1000 1000 10 50",
            "pwd /srv/app",
            "home /home/app",
            "env FROM_IMAGE=yes SHARED=image",
        ]
    );
    cs.assert_no_container_at_all();
}

#[test]
fn flags_override_the_image_config() {
    let (cs, image) = setup("run-config:latest");
    // A command replaces Cmd only; -e, -w and -u replace theirs; -e HOME wins.
    assert_eq!(
        cs.run_lines(&[
            "-e",
            "SHARED=flag",
            "-e",
            "HOME=/flag-home",
            "-w",
            "/tmp",
            "-u",
            "root",
            &image,
            "one",
            "two",
        ]),
        [
            "args one two",
            "ids 0 0 0 10",
            "pwd /tmp",
            "home /flag-home",
            "env FROM_IMAGE=yes SHARED=flag",
        ]
    );
    // --entrypoint replaces Entrypoint and drops Cmd (as docker).
    assert_eq!(
        cs.run_lines(&["--entrypoint", "/bin/echo", &image]),
        [""],
        "no from-cmd after another entrypoint"
    );
    assert_eq!(
        cs.run_lines(&[
            "--entrypoint",
            "/bin/sh",
            &image,
            "-c",
            "echo sh as $(id -u) in $(pwd)"
        ]),
        ["sh as 1000 in /srv/app"]
    );
    // "" removes it: the command alone runs.
    assert_eq!(
        cs.run_lines(&["--entrypoint", "", &image, "echo", "plain"]),
        ["plain"]
    );
    let (code, _, err) = cs.run_rm(&["--entrypoint", "", &image]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no command given and the image has no entrypoint or cmd"),
        "{err}"
    );
    cs.assert_no_container_at_all();
}

#[test]
fn users_and_groups_resolve_by_name_and_number_from_the_rootfs() {
    let (cs, image) = setup("run-config:latest");
    // (spec, `id -u`, `id -g`, `id -G`, HOME): a name's primary group and
    // the groups listing it unless a group is given; a number not in passwd
    // runs with gid 0 and HOME /, as docker.
    for (spec, ids, home) in [
        ("app", "1000 1000 1000 10 50", "/home/app"),
        ("1000", "1000 1000 1000 10 50", "/home/app"),
        ("svc", "1001 1001 1001 50", "/srv"),
        ("app:staff", "1000 50 50", "/home/app"),
        ("app:4242", "1000 4242 4242", "/home/app"),
        ("1001:wheel", "1001 10 10", "/srv"),
        ("4321", "4321 0 0", "/"),
        ("4321:staff", "4321 50 50", "/"),
        ("nobody", "65534 65534 65534", "/"),
        ("1000:1000", "1000 1000 1000", "/home/app"),
    ] {
        let out = cs.run_lines(&["-u", spec, &image]);
        assert_eq!(
            out[1..4],
            [
                format!("ids {ids}"),
                "pwd /srv/app".into(),
                format!("home {home}")
            ],
            "-u {spec}"
        );
    }
    // The same in a user namespace (ids inside it; the rootfs is id-mapped).
    let out = cs.run_lines(&["--userns", "-u", "app", &image]);
    assert_eq!(out[1], "ids 1000 1000 1000 10 50");
    cs.assert_no_container_at_all();
}

#[test]
fn an_unknown_user_or_group_is_refused_and_leaves_nothing() {
    let (cs, image) = setup("run-config:latest");
    for (extra, want) in [
        (
            vec!["-u", "bob"],
            "user \"bob\": no such user in the image's /etc/passwd",
        ),
        (
            vec!["-u", "app:nosuchgroup"],
            "user \"app:nosuchgroup\": no group \"nosuchgroup\" in the image's /etc/group",
        ),
        (vec!["-u", "1:2:3"], "user \"1:2:3\": expected USER[:GROUP]"),
    ] {
        for rm in [true, false] {
            let mut args = vec!["run"];
            if rm {
                args.push("--rm");
            }
            args.extend(&extra);
            args.extend([image.as_str(), "true"]);
            let err = cs.fail(&args);
            assert!(
                err.contains(&format!("image {image}")) && err.contains(want),
                "{args:?}: {err}"
            );
            cs.assert_no_container_at_all();
        }
    }
}

#[test]
fn numeric_users_on_an_image_without_them_and_home_defaults() {
    let (cs, image) = setup("busybox:latest");
    // Not in busybox's /etc/passwd: no names, gid as given, HOME /.
    assert_eq!(
        cs.run_lines(&["-u", "1000:1000", &image, "sh", "-c", "id; echo $HOME"]),
        ["uid=1000 gid=1000 groups=1000", "/"]
    );
    // The default user is root, with root's HOME; -u 0 is the same.
    for user in [&[][..], &["-u", "0"][..]] {
        let mut args = user.to_vec();
        args.extend([image.as_str(), "sh", "-c", "id; echo $HOME"]);
        assert_eq!(
            cs.run_lines(&args),
            ["uid=0(root) gid=0(root) groups=0(root)", "/root"],
            "{user:?}"
        );
    }
    cs.assert_no_container_at_all();
}

#[test]
fn a_missing_working_directory_is_made_as_docker_makes_it() {
    let (cs, image) = setup("busybox:latest");
    let show = "pwd; stat -c '%u:%g %a' /new /new/dir";
    // Made by the container's root, 0755: also with a read-only root, and
    // owned by the container's root in a user namespace.
    for extra in [&[][..], &["-u", "1000"], &["--read-only"], &["--userns"]] {
        let mut args = extra.to_vec();
        args.extend(["-w", "/new/./x/../dir", image.as_str(), "sh", "-c", show]);
        assert_eq!(
            cs.run_lines(&args),
            ["/new/dir", "0:0 755", "0:0 755"],
            "{extra:?}"
        );
    }
    // An existing one is used as it is.
    assert_eq!(
        cs.run_lines(&["-w", "/tmp", &image, "sh", "-c", "pwd; stat -c %a ."]),
        ["/tmp", "1777"]
    );
    for (w, want) in [
        (
            "rel/dir",
            "working directory \"rel/dir\": must be an absolute path",
        ),
        ("/data/hello.txt/sub", "/data/hello.txt is not a directory"),
    ] {
        for rm in [true, false] {
            let mut args = vec!["run"];
            if rm {
                args.push("--rm");
            }
            args.extend(["-w", w, image.as_str(), "true"]);
            let err = cs.fail(&args);
            assert!(err.contains(want), "{args:?}: {err}");
            cs.assert_no_container_at_all();
        }
    }
}
