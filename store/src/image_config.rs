//! What the store itself reads of an image config: the platform it is for
//! and its layers' diff_ids. The runtime reads the rest (`config.config`).

use crate::error::{Error, Result};
use crate::platform::Platform;

/// Configs above this are refused, at pull (from the descriptor, before a
/// byte is fetched) and wherever one is read whole (unpack, run). containerd
/// has no cap of its own for configs; real ones are a few KiB (long build
/// histories and labels make them tens). A cap twice the manifests' keeps a
/// hostile config from costing more than that in memory each time it is read,
/// while leaving any real one far below it.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

#[derive(Debug, serde::Deserialize)]
pub struct ImageConfigHead {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Debug, serde::Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<String>,
}

impl ImageConfigHead {
    /// `what` names the config in errors ("config sha256:… of IMAGE").
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
            what: what.to_string(),
            reason: e.to_string(),
        })
    }

    /// The platform the config says the image is for, normalized as
    /// containerd does before it matches (`x86_64` is amd64).
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
        .normalized()
    }

    /// An image whose config cannot describe its manifest's `layers` can
    /// never be unpacked: one diff_id per layer, each a digest.
    pub fn check_layers(&self, layers: usize, what: &str) -> Result<()> {
        let ids = &self.rootfs.diff_ids;
        if ids.len() != layers {
            return Err(Error::Malformed {
                what: what.to_string(),
                reason: format!(
                    "it lists {} diff_ids, but the manifest has {layers} layers (such an image can never be unpacked)",
                    ids.len()
                ),
            });
        }
        for d in ids {
            cstore_registry::parse_digest(d).map_err(|e| Error::Malformed {
                what: what.to_string(),
                reason: format!("diff_id: {e}"),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_platform() {
        let d = format!("sha256:{}", "a".repeat(64));
        let json = format!(
            r#"{{"os":"linux","architecture":"arm64","variant":"v8","rootfs":{{"type":"layers","diff_ids":["{d}","{d}"]}}}}"#
        );
        let c = ImageConfigHead::parse(json.as_bytes(), "config x").unwrap();
        assert_eq!(c.platform().to_string(), "linux/arm64/v8");
        c.check_layers(2, "config x").unwrap();
        let e = c.check_layers(3, "config x").unwrap_err().to_string();
        assert!(
            e.contains("config x") && e.contains("2 diff_ids") && e.contains("3 layers"),
            "{e}"
        );

        let bad = r#"{"os":"linux","architecture":"amd64","rootfs":{"diff_ids":["sha256:xyz"]}}"#;
        let c = ImageConfigHead::parse(bad.as_bytes(), "config y").unwrap();
        assert!(c
            .check_layers(1, "config y")
            .unwrap_err()
            .to_string()
            .contains("config y"));
        let e = ImageConfigHead::parse(b"{}", "config z")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config z") && e.contains("rootfs"), "{e}");
    }
}
