//! Platform selection from an image index, the way containerd's default
//! matcher does it: OS and architecture must match; a variant asked for must
//! match (arm64's empty variant means v8).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the running host.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant: variant.map(String::from),
        }
    }

    fn normalized_variant(&self) -> Option<&str> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", None | Some("")) => Some("v8"),
            (_, Some("")) => None,
            (_, v) => v,
        }
    }

    /// The platform as containerd's `platforms.Normalize` writes it: OS and
    /// architecture lowercased, aliases (`x86_64`, `aarch64`, `armhf`, ...)
    /// to their Go names, numeric variants with a `v`. Image configs are
    /// written by many tools, not all of which use the Go names.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase);
        let (architecture, variant) = match (arch.as_str(), variant.as_deref()) {
            ("i386", _) => ("386".to_string(), None),
            ("x86_64" | "x86-64" | "amd64", Some("v1")) => ("amd64".to_string(), None),
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64".to_string(), v.map(String::from)),
            ("aarch64" | "arm64", Some("8" | "v8")) => ("arm64".to_string(), Some("v8".into())),
            ("aarch64" | "arm64", v) => ("arm64".to_string(), v.map(String::from)),
            ("armhf", _) => ("arm".to_string(), Some("v7".into())),
            ("armel", _) => ("arm".to_string(), Some("v6".into())),
            ("arm", None | Some("" | "7")) => ("arm".to_string(), Some("v7".into())),
            ("arm", Some(v @ ("5" | "6" | "8"))) => ("arm".to_string(), Some(format!("v{v}"))),
            (a, v) => (a.to_string(), v.map(String::from)),
        };
        Platform {
            os,
            architecture,
            variant: variant.filter(|v| !v.is_empty()),
        }
    }

    /// Does an index entry for `other` run here?
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        match self.normalized_variant() {
            // The host's own default variant accepts an entry that names none.
            Some(v) => other.normalized_variant().is_none_or(|o| o == v),
            None => true,
        }
    }

    pub fn from_oci(p: &oci_spec::image::Platform) -> Self {
        Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone().filter(|v| !v.is_empty()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(Error::InvalidPlatform {
                platform: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn matching_follows_containerd() {
        assert!(p("linux/amd64").matches(&p("linux/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        assert!(
            p("linux/arm64").matches(&p("linux/arm64/v8")),
            "arm64 means v8"
        );
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/arm/v7").matches(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(
            p("linux/arm").matches(&p("linux/arm/v6")),
            "no variant asked: any"
        );
    }

    #[test]
    fn normalization_follows_containerd() {
        let n = |os: &str, arch: &str, v: Option<&str>| {
            Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: v.map(String::from),
            }
            .normalized()
            .to_string()
        };
        assert_eq!(n("Linux", "x86_64", None), "linux/amd64");
        assert_eq!(n("linux", "amd64", Some("v1")), "linux/amd64");
        assert_eq!(n("linux", "aarch64", None), "linux/arm64");
        assert_eq!(n("linux", "arm64", Some("8")), "linux/arm64/v8");
        assert_eq!(n("linux", "armhf", None), "linux/arm/v7");
        assert_eq!(n("linux", "arm", None), "linux/arm/v7");
        assert_eq!(n("linux", "arm", Some("6")), "linux/arm/v6");
        assert_eq!(n("linux", "i386", None), "linux/386");
        assert_eq!(n("linux", "s390x", None), "linux/s390x");
        assert!(p("linux/amd64").matches(
            &Platform {
                os: "linux".into(),
                architecture: "x86_64".into(),
                variant: None
            }
            .normalized()
        ));
    }

    #[test]
    fn parse_errors_name_the_input() {
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let e = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(Platform::host().os, "linux");
    }
}
