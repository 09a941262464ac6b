//! `cstore run` as root: the container's stdio (`-t` through a real pty
//! driven like a user's terminal, `-i`, and /dev/null without it).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::containers::busybox;
use crate::harness::Cstore;

/// `cstore ARGS` with `input` on a pipe that is then closed; its exit
/// status and stdout.
fn piped(cs: &Cstore, args: &[&str], input: &[u8], what: &str) -> (ExitStatus, String) {
    let mut child = cs
        .cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let st = wait_for(&mut child, 60, what);
    (st, stdout_of(&mut child))
}

/// All a finished child wrote to its piped stdout.
fn stdout_of(child: &mut Child) -> String {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// Wait for `child`, killing it (and failing) after `secs`.
fn wait_for(child: &mut Child, secs: u64, what: &str) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    assert_eq!(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
}

/// cstore as a user's terminal would run it: its stdio is the slave of a
/// fresh pty, which is its controlling terminal; we hold the master.
struct Terminal {
    master: std::fs::File,
    /// The terminal's settings before cstore started.
    initial: nix::sys::termios::Termios,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Terminal {
    fn spawn(cs: &Cstore, args: &[&str], rows: u16, cols: u16) -> Terminal {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_winsize(&pty.master, rows, cols);
        let initial = nix::sys::termios::tcgetattr(&pty.master).unwrap();
        let slave = std::fs::File::from(pty.slave);
        let mut cmd = cs.cmd(args);
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd); // our copies of the slave: EIO on the master once cstore is gone
        let master = std::fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let (mut r, out) = (master.try_clone().unwrap(), output.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master,
            initial,
            child,
            output,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Wait until the output has `n` occurrences of `s`.
    fn expect(&self, s: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.text().matches(s).count() < n {
            assert!(
                Instant::now() < deadline,
                "waited for {s:?} x{n}; output so far: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    fn finish(mut self) -> (i32, String) {
        let st = wait_for(&mut self.child, 60, "cstore run -t");
        self.reader.take().unwrap().join().unwrap();
        (st.code().unwrap_or(-1), self.text())
    }
}

#[test]
fn tty_interactive_shell_through_a_real_pty() {
    let (cs, image) = busybox();
    let mut t = Terminal::spawn(&cs, &["run", "--rm", "-it", &image, "sh"], 33, 101);
    let before = t.initial.clone();
    // busybox sh shows "/ # " once it reads the terminal.
    t.expect("# ", 1);
    // While it runs, our terminal is raw: no echo, no line editing.
    let during = nix::sys::termios::tcgetattr(&t.master).unwrap();
    use nix::sys::termios::LocalFlags;
    assert!(!during.local_flags.contains(LocalFlags::ECHO));
    assert!(!during.local_flags.contains(LocalFlags::ICANON));
    t.send("tty; echo $((6*7)); stty size\n");
    t.expect("33 101", 1);
    // A resize reaches the container (SIGWINCH on our side, relayed).
    set_winsize(&t.master.try_clone().unwrap().into(), 40, 120);
    std::thread::sleep(Duration::from_millis(300));
    t.send("stty size; exit 3\n");
    let master = t.master.try_clone().unwrap();
    let (code, out) = t.finish();
    assert_eq!(code, 3, "exit status passes through; output: {out:?}");
    assert!(out.contains("/dev/pts/"), "tty names a pty: {out:?}");
    assert!(
        out.contains("\n42\r\n") || out.contains("42\r\n"),
        "{out:?}"
    );
    assert!(out.contains("40 120"), "resize reached the pty: {out:?}");
    // The terminal is back as it was.
    let after = nix::sys::termios::tcgetattr(&master).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    cs.assert_no_containers();
}

#[test]
fn tty_is_restored_when_the_command_fails() {
    let (cs, image) = busybox();
    let t = Terminal::spawn(&cs, &["run", "--rm", "-it", &image, "/no/such/cmd"], 24, 80);
    let before = t.initial.clone();
    let master = t.master.try_clone().unwrap();
    let (code, out) = t.finish();
    assert_ne!(code, 0, "{out:?}");
    let after = nix::sys::termios::tcgetattr(&master).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "{out:?}");
    assert_eq!(after.input_flags, before.input_flags);
    cs.assert_no_containers();
}

#[test]
fn tty_without_interactive_shows_output_and_piped_input_ends_with_eof() {
    let (cs, image) = busybox();
    // -t alone: output through the pty, stdin not read, terminal not raw.
    let t = Terminal::spawn(
        &cs,
        &["run", "--rm", "-t", &image, "sh", "-c", "tty; exit 5"],
        24,
        80,
    );
    let (code, out) = t.finish();
    assert_eq!(code, 5, "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    // The pty comes from the container's own devpts, in a user namespace too.
    let t = Terminal::spawn(
        &cs,
        &[
            "run",
            "--rm",
            "-t",
            "--userns=300000:65536",
            &image,
            "sh",
            "-c",
            "tty; cat /proc/self/uid_map; stat -c %u:%g $(tty)",
        ],
        24,
        80,
    );
    let (code, out) = t.finish();
    assert_eq!(code, 0, "{out:?}");
    // (cstore's own log lines share the terminal.)
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .skip_while(|l| !l.starts_with("/dev/pts/"))
        .collect();
    assert!(lines.len() >= 3, "{out:?}");
    assert_eq!(lines[1..3], ["0 300000 65536", "0:5"], "{out:?}");

    // -it with piped stdin: the end of input is EOF to the program inside.
    let (st, out) = piped(
        &cs,
        &["run", "--rm", "-it", &image, "cat"],
        b"piped\n",
        "cstore run -it cat < pipe",
    );
    assert!(st.success(), "{st:?}: {out:?}");
    assert!(out.contains("piped"), "{out:?}");
    cs.assert_no_containers();
}

#[test]
fn interactive_passes_stdin_and_without_it_stdin_is_dev_null() {
    let (cs, image) = busybox();
    let (st, out) = piped(
        &cs,
        &["run", "--rm", "-i", &image, "cat"],
        b"hi\n",
        "cstore run -i cat",
    );
    assert!(st.success(), "{st:?}");
    assert_eq!(out, "hi\n");

    // Without -i, cat sees EOF at once although our stdin stays open.
    let mut child = cs
        .cmd(&[
            "run",
            "--rm",
            &image,
            "sh",
            "-c",
            "cat; ls -l /proc/self/fd/0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let open_stdin = child.stdin.take().unwrap();
    let st = wait_for(&mut child, 60, "cstore run cat (no -i)");
    drop(open_stdin);
    let out = stdout_of(&mut child);
    assert!(st.success(), "{st:?}: {out}");
    assert!(out.trim_end().ends_with("-> /dev/null"), "{out}");
    cs.assert_no_containers();
}
