//! cstore on a node (issue #17): what this kernel and host give cstore
//! ([`check`], `cstore check`) and putting cstore on a node ([`install`]).

pub mod check;
mod error;
pub mod install;

pub use error::{Error, Result};
