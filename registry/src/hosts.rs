//! Registry hosts as containerd configures them: `DIR/<registry>/hosts.toml`
//! (containerd's format, so Spegel, Dragonfly, Harbor's proxy cache and
//! other mirrors plug in as they do for containerd), `DIR/_default/hosts.toml`
//! for registries without their own, and docker's older certs.d layout
//! (`*.crt` CAs, `*.cert` + `*.key` client pairs) where a registry's
//! directory has no hosts.toml.
//!
//! ```toml
//! server = "https://registry-1.docker.io"      # the upstream (default: the registry)
//! ca = "/etc/certs/upstream-ca.pem"             # for the upstream
//!
//! [host."https://mirror.example:5000"]          # tried first, in file order
//!   capabilities = ["pull", "resolve"]          # default: both
//!   ca = ["/etc/certs/mirror-ca.pem"]           # string or list; relative to this file
//!   client = [["/etc/certs/c.cert", "/etc/certs/c.key"]]   # or "c.pem" (cert + key)
//!   skip_verify = false
//!   override_path = false    # true: the URL's path is the API root (no /v2 added)
//!   [host."https://mirror.example:5000".header]
//!     x-custom = "value"
//! ```
//!
//! Mirrors with `resolve` answer tag lookups, those with `pull` serve blobs
//! and manifests by digest (both verified by digest as from the registry).
//! A mirror that fails is skipped and the next host asked, the upstream last;
//! one whose connection failed is not asked again by this client. Credentials
//! for a mirror are its own (docker's config for its host), never the
//! upstream's `--creds`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;

use crate::error::{Error, Result};

/// Where cstore looks by default: its own directory, else containerd's
/// (a node set up for containerd mirrors gets them in cstore too).
pub const DEFAULT_DIRS: [&str; 2] = ["/etc/cstore/certs.d", "/etc/containerd/certs.d"];

/// hosts.toml and the files it names are read up to this size.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The default hosts directory: the first of `DEFAULT_DIRS` that exists.
pub fn default_dir() -> Option<PathBuf> {
    DEFAULT_DIRS.iter().map(PathBuf::from).find(|p| p.is_dir())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
    };
}

/// TLS settings of one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// PEM files of CAs trusted besides the system's.
    pub ca: Vec<PathBuf>,
    /// (certificate, key) PEM files; the same file when it holds both.
    pub client: Vec<(PathBuf, PathBuf)>,
    pub skip_verify: bool,
}

/// One host to ask, as configured (before a client is built for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// The API root, ending in `/`: requests go to `ROOT<repository>/...`.
    pub root: Url,
    pub capabilities: Capabilities,
    pub tls: Tls,
    pub headers: Vec<(String, String)>,
    /// The registry itself (last in the list), rather than a mirror.
    pub upstream: bool,
    /// The scheme came from the configuration (false for the default
    /// upstream, which keeps the loopback TLS → HTTP fallback).
    pub explicit_scheme: bool,
}

/// A host with its HTTP client.
#[derive(Clone)]
pub struct Endpoint {
    pub spec: HostSpec,
    /// `host[:port]` of the root: what errors name, the key for tokens, and
    /// the host docker's config is asked credentials for.
    pub host: String,
    pub http: reqwest::Client,
    pub headers: HeaderMap,
}

impl Endpoint {
    /// The URL of `path` under `repository`, with `scheme` for a host whose
    /// scheme the client may still change (the default upstream).
    pub fn url(&self, scheme: &str, repository: &str, path: &str) -> Result<Url> {
        let mut root = self.spec.root.clone();
        if !self.spec.explicit_scheme && root.scheme() != scheme {
            root.set_scheme(scheme)
                .map_err(|_| Error::InvalidReference {
                    reference: repository.to_string(),
                    reason: format!("cannot speak {scheme} to {root}"),
                })?;
        }
        let s = format!("{root}{repository}/{path}");
        Url::parse(&s).map_err(|e| Error::InvalidReference {
            reference: repository.to_string(),
            reason: format!("{s}: {e}"),
        })
    }
}

/// `host[:port]` of a URL.
pub fn host_of(u: &Url) -> String {
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
        None => u.host_str().unwrap_or("").to_string(),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::HostsConfig {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_capped(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| bad(path, e.to_string()))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(bad(path, format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    Ok(buf)
}

/// The API root of a host URL: its path when `override_path`, else the path
/// with `/v2` appended unless it ends so already (containerd's rule).
pub fn api_root(url: &str, override_path: bool) -> std::result::Result<Url, String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut u = Url::parse(&with_scheme).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{url:?}: not http(s)"));
    }
    if !u.username().is_empty() || u.password().is_some() || u.query().is_some() {
        return Err(format!("{url:?}: user info or a query is not allowed"));
    }
    let path = u.path().trim_end_matches('/').to_string();
    let path = if override_path {
        path
    } else if path.is_empty() {
        "/v2".to_string()
    } else if path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    u.set_path(&format!("{path}/"));
    Ok(u)
}

/// The hosts for `registry` (its name as in references: `docker.io`,
/// `127.0.0.1:5000`) from `dir`: mirrors in file order, the upstream last.
/// `default_upstream` is the registry's own API root.
pub fn load(dir: Option<&Path>, registry: &str, default_upstream: Url) -> Result<Vec<HostSpec>> {
    let upstream = |tls: Tls| HostSpec {
        root: default_upstream.clone(),
        capabilities: Capabilities::ALL,
        tls,
        headers: vec![],
        upstream: true,
        explicit_scheme: false,
    };
    let Some(dir) = dir else {
        return Ok(vec![upstream(Tls::default())]);
    };
    // A name with a path separator or `..` cannot be a registry directory.
    if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
        return Ok(vec![upstream(Tls::default())]);
    }
    let own = dir.join(registry);
    let file = own.join("hosts.toml");
    if file.is_file() {
        return parse(&file, &read_capped(&file)?, upstream(Tls::default()));
    }
    if own.is_dir() {
        return Ok(vec![upstream(legacy_certs(&own)?)]);
    }
    let default = dir.join("_default").join("hosts.toml");
    if default.is_file() {
        return parse(&default, &read_capped(&default)?, upstream(Tls::default()));
    }
    Ok(vec![upstream(Tls::default())])
}

/// docker's certs.d: `*.crt` are CAs, `X.cert` with `X.key` a client pair.
fn legacy_certs(dir: &Path) -> Result<Tls> {
    let mut tls = Tls::default();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => tls.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                if !key.is_file() {
                    return Err(bad(&p, "client certificate without its .key"));
                }
                tls.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(tls)
}

fn strings(item: &toml_edit::Item, file: &Path, what: &str) -> Result<Vec<String>> {
    if let Some(s) = item.as_str() {
        return Ok(vec![s.to_string()]);
    }
    let arr = item
        .as_array()
        .ok_or_else(|| bad(file, format!("{what}: a string or a list of strings")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(String::from)
                .ok_or_else(|| bad(file, format!("{what}: a string or a list of strings")))
        })
        .collect()
}

/// A path from a hosts.toml: relative ones are relative to its directory.
fn rel(file: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new("/")).join(p)
    }
}

/// capabilities (if given), TLS, headers, override_path.
type Settings = (Option<Capabilities>, Tls, Vec<(String, String)>, bool);

/// The settings of one table (the top level or a `[host."URL"]`).
fn settings(t: &dyn toml_edit::TableLike, file: &Path, what: &str) -> Result<Settings> {
    let caps = match t.get("capabilities") {
        None => None,
        Some(i) => {
            let list = strings(i, file, &format!("{what} capabilities"))?;
            let mut c = Capabilities {
                pull: false,
                resolve: false,
            };
            for s in list {
                match s.as_str() {
                    "pull" => c.pull = true,
                    "resolve" => c.resolve = true,
                    // cstore never pushes; other words are containerd's to know.
                    "push" => {}
                    other => {
                        return Err(bad(file, format!("{what}: unknown capability {other:?}")))
                    }
                }
            }
            Some(c)
        }
    };
    let mut tls = Tls::default();
    if let Some(i) = t.get("ca") {
        tls.ca = strings(i, file, &format!("{what} ca"))?
            .iter()
            .map(|p| rel(file, p))
            .collect();
    }
    if let Some(i) = t.get("client") {
        let err = || {
            bad(
                file,
                format!("{what} client: a path, or a list of paths or [cert, key] pairs"),
            )
        };
        if let Some(s) = i.as_str() {
            tls.client.push((rel(file, s), rel(file, s)));
        } else {
            for v in i.as_array().ok_or_else(err)?.iter() {
                if let Some(s) = v.as_str() {
                    tls.client.push((rel(file, s), rel(file, s)));
                } else {
                    let pair = v.as_array().ok_or_else(err)?;
                    let cert = pair.get(0).and_then(|v| v.as_str()).ok_or_else(err)?;
                    let key = pair.get(1).and_then(|v| v.as_str()).unwrap_or("");
                    let key = if key.is_empty() { cert } else { key };
                    tls.client.push((rel(file, cert), rel(file, key)));
                }
            }
        }
    }
    if let Some(i) = t.get("skip_verify") {
        tls.skip_verify = i
            .as_bool()
            .ok_or_else(|| bad(file, format!("{what} skip_verify: true or false")))?;
    }
    let mut headers = Vec::new();
    if let Some(h) = t.get("header") {
        let h = h
            .as_table_like()
            .ok_or_else(|| bad(file, format!("{what} header: a table")))?;
        for (k, v) in h.iter() {
            for value in strings(v, file, &format!("{what} header {k}"))? {
                HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| bad(file, format!("{what}: bad header name {k:?}")))?;
                HeaderValue::from_str(&value)
                    .map_err(|_| bad(file, format!("{what}: bad value of header {k}")))?;
                headers.push((k.to_string(), value));
            }
        }
    }
    let override_path = match t.get("override_path") {
        None => false,
        Some(i) => i
            .as_bool()
            .ok_or_else(|| bad(file, format!("{what} override_path: true or false")))?,
    };
    Ok((caps, tls, headers, override_path))
}

/// Parses a hosts.toml; `upstream` is the registry as it is without one.
pub fn parse(file: &Path, bytes: &[u8], mut upstream: HostSpec) -> Result<Vec<HostSpec>> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad(file, "not UTF-8"))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| bad(file, e.to_string()))?;
    let top = doc.as_table();
    let (caps, tls, headers, override_path) = settings(top, file, "server")?;
    if let Some(server) = top.get("server") {
        let s = server
            .as_str()
            .ok_or_else(|| bad(file, "server: a URL string"))?;
        upstream.root =
            api_root(s, override_path).map_err(|e| bad(file, format!("server: {e}")))?;
        upstream.explicit_scheme = true;
    }
    upstream.capabilities = caps.unwrap_or(Capabilities::ALL);
    upstream.tls = tls;
    upstream.headers = headers;
    let mut hosts = Vec::new();
    if let Some(h) = top.get("host") {
        let h = h
            .as_table_like()
            .ok_or_else(|| bad(file, "host: a table of [host.\"URL\"] tables"))?;
        // Document order: the order mirrors are tried in.
        for (url, t) in h.iter() {
            let what = format!("host {url:?}");
            let t = t
                .as_table_like()
                .ok_or_else(|| bad(file, format!("{what}: a table")))?;
            let (caps, tls, headers, override_path) = settings(t, file, &what)?;
            let root = api_root(url, override_path).map_err(|e| bad(file, e))?;
            hosts.push(HostSpec {
                root,
                capabilities: caps.unwrap_or(Capabilities::ALL),
                tls,
                headers,
                upstream: false,
                explicit_scheme: true,
            });
        }
    }
    hosts.push(upstream);
    Ok(hosts)
}

/// The HTTP client every host gets, before its TLS settings: cstore's user
/// agent, timeouts, and no automatic redirects (followed by hand, see
/// `RegistryClient::send_following`).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("cstore/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(15))
        // No overall timeout (layers are large); a stalled read still ends.
        .read_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
}

/// Builds the endpoint of `spec`: its own client when it has TLS settings.
pub fn endpoint(spec: HostSpec, default: &reqwest::Client) -> Result<Endpoint> {
    let host = host_of(&spec.root);
    let mut headers = HeaderMap::new();
    for (k, v) in &spec.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    let http = if spec.tls == Tls::default() {
        default.clone()
    } else {
        let mut b = client_builder();
        for ca in &spec.tls.ca {
            let pem = read_capped(ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(ca, format!("CA for {host}: {e}")))?;
            if certs.is_empty() {
                return Err(bad(ca, format!("CA for {host}: no certificate in it")));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        // reqwest takes one identity; the first pair is it.
        if let Some((cert, key)) = spec.tls.client.first() {
            let mut pem = read_capped(cert)?;
            if key != cert {
                pem.push(b'\n');
                pem.extend(read_capped(key)?);
            }
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| bad(cert, format!("client certificate for {host}: {e}")))?;
            b = b.identity(id);
        }
        if spec.tls.skip_verify {
            tracing::warn!(
                host,
                "skip_verify: the host's TLS certificate is not checked"
            );
            b = b.danger_accept_invalid_certs(true);
        }
        b.build().map_err(|e| Error::Transport {
            registry: host.clone(),
            what: "HTTP client".into(),
            message: e.to_string(),
        })?
    };
    Ok(Endpoint {
        spec,
        host,
        http,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> HostSpec {
        HostSpec {
            root: Url::parse("https://registry-1.docker.io/v2/").unwrap(),
            capabilities: Capabilities::ALL,
            tls: Tls::default(),
            headers: vec![],
            upstream: true,
            explicit_scheme: false,
        }
    }

    #[test]
    fn api_roots_follow_containerds_path_rule() {
        let r = |u: &str, o: bool| api_root(u, o).unwrap().to_string();
        assert_eq!(r("https://m.example", false), "https://m.example/v2/");
        assert_eq!(r("https://m.example/", false), "https://m.example/v2/");
        assert_eq!(r("m.example:5000", false), "https://m.example:5000/v2/");
        assert_eq!(r("http://m.example/v2", false), "http://m.example/v2/");
        assert_eq!(
            r("http://m.example/cache", false),
            "http://m.example/cache/v2/"
        );
        assert_eq!(
            r("http://m.example/cache/x", true),
            "http://m.example/cache/x/"
        );
        assert!(api_root("ftp://m.example", false).is_err());
        assert!(api_root("https://u:p@m.example", false).is_err());
    }

    #[test]
    fn hosts_toml_in_order_with_settings() {
        let file = Path::new("/etc/cstore/certs.d/docker.io/hosts.toml");
        let text = br#"
server = "https://registry-1.docker.io"
ca = "up-ca.pem"

[host."http://second.example:5000"]
  capabilities = ["pull"]
  override_path = true
[host."https://first.example"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/ca.pem", "rel/ca2.pem"]
  client = [["c.cert", "c.key"], ["both.pem", ""]]
  skip_verify = true
  [host."https://first.example".header]
    x-a = "1"
    x-b = ["2", "3"]
"#;
        let hosts = parse(file, text, up()).unwrap();
        assert_eq!(hosts.len(), 3);
        // File order, not sorted.
        assert_eq!(hosts[0].root.as_str(), "http://second.example:5000/");
        assert_eq!(
            hosts[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false
            }
        );
        let f = &hosts[1];
        assert_eq!(f.root.as_str(), "https://first.example/v2/");
        assert_eq!(
            f.tls.ca,
            [
                PathBuf::from("/abs/ca.pem"),
                PathBuf::from("/etc/cstore/certs.d/docker.io/rel/ca2.pem")
            ]
        );
        let d = |n: &str| PathBuf::from("/etc/cstore/certs.d/docker.io").join(n);
        assert_eq!(
            f.tls.client,
            [(d("c.cert"), d("c.key")), (d("both.pem"), d("both.pem"))]
        );
        assert!(f.tls.skip_verify && !f.upstream);
        assert_eq!(
            f.headers,
            [
                ("x-a".into(), "1".into()),
                ("x-b".into(), "2".into()),
                ("x-b".into(), "3".into())
            ]
        );
        let u = &hosts[2];
        assert!(u.upstream && u.explicit_scheme);
        assert_eq!(u.root.as_str(), "https://registry-1.docker.io/v2/");
        assert_eq!(u.tls.ca, [d("up-ca.pem")]);
    }

    #[test]
    fn bad_hosts_toml_names_the_file_and_the_setting() {
        let file = Path::new("/x/hosts.toml");
        for (text, want) in [
            (
                &b"[host.\"https://m\"]\ncapabilities = [\"fly\"]\n"[..],
                "unknown capability",
            ),
            (
                b"[host.\"https://m\"]\nskip_verify = \"yes\"\n",
                "skip_verify",
            ),
            (b"server = 5\n", "server"),
            (b"[host.\"ftp://m\"]\n", "not http(s)"),
            (b"server = \n", "/x/hosts.toml"),
        ] {
            let e = parse(file, text, up()).unwrap_err().to_string();
            assert!(e.contains("/x/hosts.toml") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn lookup_prefers_the_registry_dir_then_default() {
        let d = tempfile::tempdir().unwrap();
        let def = Url::parse("https://r.example:5000/v2/").unwrap();
        // Nothing configured: the upstream alone.
        let h = load(Some(d.path()), "r.example:5000", def.clone()).unwrap();
        assert_eq!(h.len(), 1);
        std::fs::create_dir_all(d.path().join("_default")).unwrap();
        std::fs::write(
            d.path().join("_default/hosts.toml"),
            "[host.\"http://mirror\"]\n",
        )
        .unwrap();
        let h = load(Some(d.path()), "r.example:5000", def.clone()).unwrap();
        assert_eq!(h[0].root.as_str(), "http://mirror/v2/");
        assert_eq!(h[1].root, def);
        // docker's layout in the registry's own dir wins over _default.
        let own = d.path().join("r.example:5000");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("ca.crt"), "x").unwrap();
        std::fs::write(own.join("client.cert"), "x").unwrap();
        std::fs::write(own.join("client.key"), "x").unwrap();
        let h = load(Some(d.path()), "r.example:5000", def.clone()).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].tls.ca, [own.join("ca.crt")]);
        assert_eq!(
            h[0].tls.client,
            [(own.join("client.cert"), own.join("client.key"))]
        );
        // A name that is a path goes nowhere.
        assert_eq!(load(Some(d.path()), "../etc", def).unwrap().len(), 1);
    }
}
