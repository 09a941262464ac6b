//! `cstore check`: prints what cstore_node::check found.

use std::path::Path;

use anyhow::Result;
use cstore_node::check;

/// Prints the report; false if something cstore needs is missing.
pub fn check(root: &Path, json: bool) -> Result<bool> {
    let report = check::run(root);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            println!("{:<10} {:<9} {}", f.name, f.status.name(), f.detail);
            println!("{:<10} {:<9} why: {}", "", "", f.why);
        }
    }
    Ok(report.ok())
}
