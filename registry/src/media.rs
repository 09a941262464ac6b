//! The media types of manifests, indexes and configs that cstore negotiates
//! with registries and accepts, Docker's and OCI's. (Layer media types, and
//! the compression each means, are the unpack crate's.)

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// What the registry's manifest endpoint is asked for; schema 1 is left out
/// on purpose, and still recognized if a registry sends it anyway.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestKind {
    Index,
    Manifest,
    Schema1,
}

pub fn manifest_kind(media_type: &str) -> Option<ManifestKind> {
    match media_type {
        OCI_INDEX | DOCKER_LIST => Some(ManifestKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Manifest),
        m if DOCKER_SCHEMA1.contains(&m) => Some(ManifestKind::Schema1),
        _ => None,
    }
}

/// A registry may omit or genericize Content-Type (e.g. `application/json`);
/// then the document's own `mediaType`, or its shape, decides.
pub fn sniff_manifest_media_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
        fs_layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(body).ok()?;
    if let Some(m) = p.media_type {
        return Some(m);
    }
    match (p.schema_version, p.manifests, p.layers, p.fs_layers) {
        (Some(1), ..) | (_, _, _, Some(_)) => Some(DOCKER_SCHEMA1[0].to_string()),
        (_, Some(_), _, _) => Some(OCI_INDEX.to_string()),
        (_, _, Some(_), _) => Some(OCI_MANIFEST.to_string()),
        _ => None,
    }
}

pub fn is_config(media_type: &str) -> bool {
    matches!(media_type, OCI_CONFIG | DOCKER_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_compressions() {
        assert_eq!(manifest_kind(DOCKER_LIST), Some(ManifestKind::Index));
        assert_eq!(manifest_kind(OCI_MANIFEST), Some(ManifestKind::Manifest));
        assert_eq!(
            manifest_kind(DOCKER_SCHEMA1[1]),
            Some(ManifestKind::Schema1)
        );
        assert_eq!(manifest_kind("text/html"), None);
        assert!(is_config(OCI_CONFIG) && is_config(DOCKER_CONFIG));
        assert!(!is_config(OCI_MANIFEST));
    }

    #[test]
    fn sniffing_uses_media_type_then_shape() {
        assert_eq!(
            sniff_manifest_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff_manifest_media_type(br#"{"schemaVersion":1,"fsLayers":[]}"#).as_deref(),
            Some(DOCKER_SCHEMA1[0])
        );
        assert_eq!(
            sniff_manifest_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            )
            .as_deref(),
            Some(DOCKER_MANIFEST)
        );
        assert_eq!(sniff_manifest_media_type(b"not json"), None);
    }
}
