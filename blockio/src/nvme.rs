//! NVMe Identify by NVME_IOCTL_ADMIN_CMD: the controller (CNS 01h) and
//! namespace (CNS 00h) data structures, parsed at the byte offsets the NVMe
//! Base Specification gives them (2.0, figures 275 and 280).

use cstore_os::IoError;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

pub const IDENTIFY_LEN: usize = 4096;
const ADMIN_IDENTIFY: u8 = 0x06;
const CNS_NAMESPACE: u32 = 0x00;
const CNS_CONTROLLER: u32 = 0x01;

/// `struct nvme_passthru_cmd` (linux/nvme_ioctl.h), 72 bytes.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PassthruCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub result: u32,
}

// NVME_IOCTL_ADMIN_CMD = _IOWR('N', 0x41, struct nvme_admin_cmd)
nix::ioctl_readwrite!(nvme_admin_cmd, b'N', 0x41, PassthruCmd);
// NVME_IOCTL_ID = _IO('N', 0x40): the namespace id of a namespace device.
nix::ioctl_none!(nvme_ioctl_id, b'N', 0x40);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentifyController {
    pub vendor_id: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum memory
    /// page size (0: no limit).
    pub mdts: u8,
    pub controller_id: u16,
    /// NVMe version, e.g. "1.4.0".
    pub version: String,
    pub namespaces: u32,
    pub volatile_write_cache: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LbaFormat {
    pub metadata_size: u16,
    pub data_size: u32,
    pub relative_performance: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentifyNamespace {
    pub size_lbas: u64,
    pub capacity_lbas: u64,
    pub used_lbas: u64,
    pub lba_formats: Vec<LbaFormat>,
    /// Index into `lba_formats` of the format in use.
    pub lba_format_in_use: u8,
    /// Preferred write granularity and optimal write size, in bytes, when
    /// the namespace reports them (NSFEAT bit 4).
    pub preferred_write_granularity: Option<u64>,
    pub optimal_write_size: Option<u64>,
}

impl IdentifyNamespace {
    pub fn lba_size(&self) -> u32 {
        self.lba_formats
            .get(self.lba_format_in_use as usize)
            .map_or(512, |f| f.data_size)
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .trim()
        .to_string()
}

pub fn parse_controller(b: &[u8; IDENTIFY_LEN]) -> IdentifyController {
    let ver = le32(b, 80);
    IdentifyController {
        vendor_id: le16(b, 0),
        serial: ascii(&b[4..24]),
        model: ascii(&b[24..64]),
        firmware: ascii(&b[64..72]),
        mdts: b[77],
        controller_id: le16(b, 78),
        version: format!("{}.{}.{}", ver >> 16, (ver >> 8) & 0xff, ver & 0xff),
        namespaces: le32(b, 516),
        volatile_write_cache: b[525] & 1 == 1,
    }
}

pub fn parse_namespace(b: &[u8; IDENTIFY_LEN]) -> IdentifyNamespace {
    let nlbaf = b[25] as usize + 1; // 0-based
    let flbas = b[26];
    // FLBAS bits 3:0 and, for more than 16 formats, bits 6:5 as the high part.
    let in_use = (flbas & 0x0f) | ((flbas >> 5) & 0x03) << 4;
    let lba_formats: Vec<LbaFormat> = (0..nlbaf.min(64))
        .map(|i| {
            let v = le32(b, 128 + i * 4);
            LbaFormat {
                metadata_size: (v & 0xffff) as u16,
                data_size: 1u32.checked_shl((v >> 16) & 0xff).unwrap_or(0),
                relative_performance: ((v >> 24) & 0x3) as u8,
            }
        })
        .collect();
    let lba = lba_formats
        .get(in_use as usize)
        .map_or(512, |f| f.data_size) as u64;
    let opt_perf = b[24] & (1 << 4) != 0;
    IdentifyNamespace {
        size_lbas: le64(b, 0),
        capacity_lbas: le64(b, 8),
        used_lbas: le64(b, 16),
        lba_formats,
        lba_format_in_use: in_use,
        // NPWG and NOWS are 0-based counts of logical blocks.
        preferred_write_granularity: opt_perf.then(|| (le16(b, 64) as u64 + 1) * lba),
        optimal_write_size: opt_perf.then(|| (le16(b, 72) as u64 + 1) * lba),
    }
}

fn identify(
    dev: &std::fs::File,
    path: &Path,
    cns: u32,
    nsid: u32,
) -> Result<Box<[u8; IDENTIFY_LEN]>> {
    let mut buf = Box::new([0u8; IDENTIFY_LEN]);
    let mut cmd = PassthruCmd {
        opcode: ADMIN_IDENTIFY,
        nsid,
        addr: buf.as_mut_ptr() as u64,
        data_len: IDENTIFY_LEN as u32,
        cdw10: cns,
        ..Default::default()
    };
    // SAFETY: the command points at a 4 KiB buffer that outlives the call.
    unsafe { nvme_admin_cmd(dev.as_raw_fd(), &mut cmd) }.map_err(|e| Error::Identify {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    })?;
    Ok(buf)
}

/// Identify the controller and namespace behind an NVMe namespace block
/// device (e.g. /dev/nvme0n1). Needs CAP_SYS_ADMIN.
pub fn identify_namespace_device(
    dev_path: &Path,
) -> Result<(IdentifyController, IdentifyNamespace)> {
    let f = std::fs::File::open(dev_path).map_err(|e| IoError::new("open", dev_path, e))?;
    // SAFETY: NVME_IOCTL_ID takes no argument.
    let nsid = unsafe { nvme_ioctl_id(f.as_raw_fd()) }.map_err(|e| Error::Identify {
        path: dev_path.to_path_buf(),
        source: std::io::Error::from(e),
    })? as u32;
    let ctrl = parse_controller(&*identify(&f, dev_path, CNS_CONTROLLER, 0)?);
    let ns = parse_namespace(&*identify(&f, dev_path, CNS_NAMESPACE, nsid)?);
    Ok((ctrl, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthru_struct_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
        let c = PassthruCmd::default();
        let base = &c as *const _ as usize;
        assert_eq!(&c.addr as *const _ as usize - base, 24);
        assert_eq!(&c.data_len as *const _ as usize - base, 36);
        assert_eq!(&c.cdw10 as *const _ as usize - base, 40);
        assert_eq!(&c.timeout_ms as *const _ as usize - base, 64);
        assert_eq!(&c.result as *const _ as usize - base, 68);
    }

    /// A controller page laid out by hand at the spec's offsets.
    #[test]
    fn controller_fields_at_spec_offsets() {
        let mut b = [0u8; IDENTIFY_LEN];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes()); // VID (QEMU)
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[64..72].copy_from_slice(b"8.2.0   ");
        b[77] = 7; // MDTS
        b[78..80].copy_from_slice(&5u16.to_le_bytes());
        b[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        b[525] = 1;
        let c = parse_controller(&b);
        assert_eq!(c.vendor_id, 0x1b36);
        assert_eq!(c.serial, "deadbeef");
        assert_eq!(c.model, "QEMU NVMe Ctrl");
        assert_eq!(c.firmware, "8.2.0");
        assert_eq!((c.mdts, c.controller_id, c.namespaces), (7, 5, 256));
        assert_eq!(c.version, "1.4.0");
        assert!(c.volatile_write_cache);
    }

    #[test]
    fn namespace_lba_format_and_optimal_sizes() {
        let mut b = [0u8; IDENTIFY_LEN];
        b[0..8].copy_from_slice(&2097152u64.to_le_bytes());
        b[24] = 1 << 4; // NSFEAT: optimal performance fields valid
        b[25] = 1; // NLBAF: 2 formats
        b[26] = 1; // FLBAS: format 1 in use
        b[64..66].copy_from_slice(&7u16.to_le_bytes()); // NPWG: 8 blocks
        b[72..74].copy_from_slice(&31u16.to_le_bytes()); // NOWS: 32 blocks
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes()); // 512 B
        b[132..136].copy_from_slice(&((12u32 << 16) | 8).to_le_bytes()); // 4 KiB + 8 B metadata
        let n = parse_namespace(&b);
        assert_eq!(n.size_lbas, 2097152);
        assert_eq!(n.lba_format_in_use, 1);
        assert_eq!(n.lba_size(), 4096);
        assert_eq!(n.lba_formats[1].metadata_size, 8);
        assert_eq!(n.preferred_write_granularity, Some(8 * 4096));
        assert_eq!(n.optimal_write_size, Some(32 * 4096));
    }
}
