//! For tests across the workspace: a test whose facility (a VM, a cgroup
//! hierarchy, a kernel feature) is missing says so where it cannot be missed,
//! and under `CI=true` fails instead of passing as if it had run.

use std::io::Write;

/// Call when `test` cannot run here because of `why`, and return from the
/// test. Panics under `CI=true` (where every facility is expected); else
/// writes "SKIPPED" to the real stderr (past libtest's capture, so it shows
/// in a normal run; fixtures/test.sh counts these lines).
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run here under CI=true: {why}");
    }
    // eprintln! would be captured by libtest and shown only on failure.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Whether `tool` is an executable file on PATH (a facility check).
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// The lines between `==== BEGIN name ====` and `==== END name ====`: how the
/// qemu guests of fixtures/*-vm.sh hand their results to the host.
pub fn vm_section<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let begin = format!("==== BEGIN {name} ====");
    let end = format!("==== END {name} ====");
    out.lines()
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| *l != end)
        .collect()
}
