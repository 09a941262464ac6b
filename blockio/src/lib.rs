//! cstore's block I/O layer: what device a path lives on (sysfs and NVMe
//! identify), and how to drive it (the policy the I/O engine uses).

pub mod error;
pub mod nvme;
pub mod policy;
pub mod probe;

pub use error::{Error, Result};
pub use policy::Policy;
pub use probe::{probe, DeviceInfo, DeviceKind};
pub mod buf;
pub mod engine;
pub mod ring;

pub use buf::{AlignedBuf, Buf};
pub use engine::{Completion, Engine};
pub use ring::{Backend, Done, Mode, Op, Ring};
pub mod bench;
