//! cstore's block I/O layer: what device a path lives on (sysfs and NVMe
//! identify), how to drive it (the policy), and the io_uring engine that does.

pub mod bench;
pub mod buf;
pub mod engine;
pub mod error;
pub mod nvme;
pub mod policy;
pub mod probe;
pub mod ring;
pub mod selfcheck;
pub mod stream;

pub use buf::{AlignedBuf, Buf};
pub use engine::{Completion, Engine};
pub use error::{Error, Result};
pub use policy::Policy;
pub use probe::{probe, DeviceInfo, DeviceKind};
pub use ring::{Backend, Done, Mode, Op, Ring};
pub use stream::{SeqReader, SeqWriter, StreamConfig};
