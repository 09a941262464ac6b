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
