//! Image references, normalized the way docker and containerd do it:
//! `alpine` → `docker.io/library/alpine:latest`, `host:5000/app@sha256:…`.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Digest;

use crate::error::{Error, Result};

pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    pub fn registry(&self) -> &str {
        &self.registry
    }
    pub fn repository(&self) -> &str {
        &self.repository
    }
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The host to talk to: docker.io's API lives elsewhere.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// Registries on the loopback are spoken to over plain HTTP when TLS fails,
    /// as docker does for them without an `insecure-registries` entry.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        is_loopback_host(host)
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// `localhost` or a loopback address (IPv6 in brackets or not). A name that
/// only starts like one (`127.example.com`) is not: it resolves anywhere.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 4096 {
            return Err(bad("longer than 4096 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(parse_digest(d)?)),
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/repo` has none.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|r| bad(&r))?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(|r| bad(&r))?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

/// Parse a digest; only sha256 is accepted, as containerd does by default.
pub fn parse_digest(s: &str) -> Result<Digest> {
    let bad = |reason: &str| Error::InvalidDigest {
        digest: s.to_string(),
        reason: reason.to_string(),
    };
    let (algo, hex) = s
        .split_once(':')
        .ok_or_else(|| bad("expected ALGORITHM:HEX"))?;
    if algo != "sha256" {
        return Err(bad("only sha256 digests are supported"));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("a sha256 digest is 64 lowercase hex characters"));
    }
    Digest::from_str(s).map_err(|e| bad(&e.to_string()))
}

fn validate_tag(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {t:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        ))
    }
}

fn validate_repository(r: &str) -> Result<(), String> {
    if r.is_empty() {
        return Err("empty repository name".into());
    }
    for comp in r.split('/') {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ok = !comp.is_empty()
            && comp.starts_with(alnum)
            && comp.ends_with(alnum)
            && comp
                .chars()
                .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(format!(
                "repository path component {comp:?} must be lowercase letters, digits and separators (. _ -)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn docker_hub_short_names_expand_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            "alpine".parse::<Reference>().unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn registries_with_ports_and_digests() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        assert_eq!(
            norm("127.0.0.1:5000/busybox"),
            "127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(norm("localhost/a/b:v1"), "localhost/a/b:v1");
        let r: Reference = format!("localhost:5000/busybox@{d}").parse().unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_reference(), d);
        assert!(r.is_loopback());
        let r: Reference = format!("ghcr.io/o/r:t@{d}").parse().unwrap();
        assert_eq!(r.manifest_reference(), d, "a digest wins over the tag");
        assert!(!r.is_loopback());
    }

    #[test]
    fn only_loopback_addresses_are_loopback() {
        for (r, want) in [
            ("127.0.0.1:5000/a", true),
            ("127.1.2.3/a", true),
            ("[::1]:5000/a", true),
            ("localhost/a", true),
            // A name that starts like an address resolves anywhere: no plain
            // HTTP fallback (and no cleartext credentials) for it.
            ("127.example.com/a", false),
            ("127.0.0.1.nip.io:5000/a", false),
            ("10.0.0.1:5000/a", false),
        ] {
            let parsed: Reference = r.parse().unwrap();
            assert_eq!(parsed.is_loopback(), want, "{r}");
        }
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "UPPER",
            "a//b",
            "a:",
            "a@sha256:xyz",
            "a@md5:00",
            "-a",
            "a:-x",
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidReference { .. } | Error::InvalidDigest { .. }
                ),
                "{bad}: {e}"
            );
        }
    }
}
