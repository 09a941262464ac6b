//! The registry client's blobs against a real CNCF distribution registry
//! (fixtures/registry.sh), the fault proxy in front of it
//! (fixtures/faultproxy.py) for broken bodies and odd answers, and a
//! token-mode registry (fixtures/tokenauth.sh) for the token cache.

use std::time::Duration;

use cstore_os::ErrorKind;
use cstore_registry::auth::Credentials;
use cstore_registry::{
    parse_digest, ClientOptions, Error, Reference, RegistryClient, MAX_RANGE_BYTES,
};
use cstore_testkit::{http, push, FaultProxy, Registry, TokenAuth};
use oci_spec::image::{Digest, ImageManifest};
use serde_json::json;
use sha2::{Digest as _, Sha256};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The Range header of each blob GET through `proxy`, in order.
fn blob_ranges(proxy: &FaultProxy) -> Vec<Option<String>> {
    proxy
        .log()
        .iter()
        .filter(|e| e["method"] == "GET" && e["path"].as_str().unwrap().contains("/blobs/"))
        .map(|e| e["range"].as_str().map(String::from))
        .collect()
}

async fn upload(addr: &str, repo: &str, data: &[u8]) -> Digest {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{addr}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "start upload");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{addr}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{url}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "finish upload");
    parse_digest(&digest).unwrap()
}

/// Bytes no two offsets of which are likely to agree for long: a wrong
/// offset cannot go unnoticed.
fn content(len: usize) -> Vec<u8> {
    let mut h = Sha256::digest(b"cstore-registry-test").to_vec();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        h = Sha256::digest(&h).to_vec();
        out.extend_from_slice(&h);
    }
    out.truncate(len);
    out
}

fn client() -> RegistryClient {
    RegistryClient::new(ClientOptions {
        plain_http: true,
        docker_config: false,
        backoff: Duration::from_millis(10),
        ..ClientOptions::default()
    })
    .unwrap()
}

/// Every chunk of a whole-blob reader, and how often it resumed.
async fn read_all(
    client: &RegistryClient,
    r: &Reference,
    d: &Digest,
    offset: u64,
    size: u64,
) -> Result<(Vec<u8>, Vec<u32>), Error> {
    let retries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = retries.clone();
    let mut blob = client
        .blob(r, d, offset, size)
        .on_retry(move |attempt, _| seen.lock().unwrap().push(attempt));
    let mut out = Vec::new();
    while let Some(c) = blob.chunk().await? {
        out.extend_from_slice(&c);
    }
    let retries = retries.lock().unwrap().clone();
    Ok((out, retries))
}

const SIZE: usize = 3 << 20;

#[test]
fn ranged_reads_are_exactly_the_bytes_asked_for() {
    let reg = Registry::start(&[]);
    let rt = rt();
    let data = content(SIZE);
    let d = rt.block_on(upload(&reg.addr, "t/ranges", &data));
    let r: Reference = format!("{}/t/ranges:x", reg.addr).parse().unwrap();
    let c = client();
    rt.block_on(async {
        for (off, len) in [
            (0u64, 1u64),
            (0, 4096),
            (1, 100_000),
            (1 << 20, 1 << 20),
            (SIZE as u64 - 1, 1),
            (0, SIZE as u64),
            (12345, 0),
        ] {
            let got = c.blob_range(&r, &d, off, len).await.unwrap();
            assert_eq!(
                &got[..],
                &data[off as usize..(off + len) as usize],
                "{len} bytes from {off}"
            );
        }
        // Past the end: the blob's size is named, asking again gets no more.
        let e = c
            .blob_range(&r, &d, SIZE as u64 - 10, 20)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
        assert!(e.to_string().contains(&SIZE.to_string()), "{e}");
        let e = c.blob_range(&r, &d, SIZE as u64 + 5, 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
        // More than a ranged read may hold.
        let e = c
            .blob_range(&r, &d, 0, MAX_RANGE_BYTES + 1)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        // A whole blob, and one from a held partial.
        let (all, retries) = read_all(&c, &r, &d, 0, SIZE as u64).await.unwrap();
        assert!(all == data && retries.is_empty());
        let (rest, _) = read_all(&c, &r, &d, 1000, SIZE as u64).await.unwrap();
        assert!(rest == data[1000..]);
        // A descriptor that says less than the registry sends.
        let e = read_all(&c, &r, &d, 0, SIZE as u64 - 1).await.unwrap_err();
        assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
        // Not there.
        let missing = parse_digest(&format!("sha256:{}", "0".repeat(64))).unwrap();
        let e = c.blob_range(&r, &missing, 0, 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    });
}

#[test]
fn broken_bodies_resume_with_range_where_they_broke_off() {
    let reg = Registry::start(&[]);
    let proxy = FaultProxy::start(&reg.addr);
    let rt = rt();
    let data = content(SIZE);
    let d = rt.block_on(upload(&reg.addr, "t/resume", &data));
    let r: Reference = format!("{}/t/resume:x", proxy.addr).parse().unwrap();
    let c = client();
    let hex = d.digest().to_string();

    // A whole blob cut off twice: two resumes, each from the byte it got to.
    proxy.set(json!([{"match": hex, "action": "truncate", "after": 1_000_000, "times": 2}]));
    let (all, retries) = rt.block_on(read_all(&c, &r, &d, 0, SIZE as u64)).unwrap();
    assert!(all == data, "the resumed bytes are the blob's");
    assert_eq!(retries, vec![1, 2]);
    assert_eq!(
        blob_ranges(&proxy),
        vec![
            None,
            Some("bytes=1000000-".to_string()),
            Some("bytes=2000000-".to_string())
        ]
    );

    // A range cut off: resumed within the range.
    http(&proxy.addr, "DELETE", "/__log", None);
    proxy.set(json!([{"match": hex, "action": "truncate", "after": 300_000, "times": 1}]));
    let got = rt
        .block_on(c.blob_range(&r, &d, 500_000, 1_000_000))
        .unwrap();
    assert!(got[..] == data[500_000..1_500_000]);
    assert_eq!(
        blob_ranges(&proxy),
        vec![
            Some("bytes=500000-1499999".to_string()),
            Some("bytes=800000-1499999".to_string())
        ]
    );

    // Cut off every time: gives up after the client's attempts, saying why.
    http(&proxy.addr, "DELETE", "/__log", None);
    proxy.set(json!([{"match": hex, "action": "truncate", "after": 1000}]));
    let e = rt
        .block_on(read_all(&c, &r, &d, 0, SIZE as u64))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("gave up after 5 attempts"), "{e}");
    assert_eq!(blob_ranges(&proxy).len(), 5);
}

#[test]
fn odd_answers_to_range_requests() {
    let reg = Registry::start(&[]);
    let proxy = FaultProxy::start(&reg.addr);
    let rt = rt();
    // Text, so the proxy can serve it as a body of its own.
    let data: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    let d = rt.block_on(upload(&reg.addr, "t/odd", &data));
    let r: Reference = format!("{}/t/odd:x", proxy.addr).parse().unwrap();
    let c = client();
    let hex = d.digest().to_string();
    let text = String::from_utf8(data.clone()).unwrap();

    // A server that ignores Range (200, the whole blob): the bytes before
    // the offset are dropped, for a resume and for a range alike.
    proxy.set(json!([{"match": hex, "action": "body", "status": 200, "body": text}]));
    let (rest, _) = rt
        .block_on(read_all(&c, &r, &d, 150_000, data.len() as u64))
        .unwrap();
    assert!(rest == data[150_000..]);
    let got = rt.block_on(c.blob_range(&r, &d, 70_000, 5000)).unwrap();
    assert!(got[..] == data[70_000..75_000]);

    // A 206 from the wrong place is refused, naming what was asked.
    proxy.set(
        json!([{"match": hex, "action": "body", "status": 206, "body": &text[..100],
        "headers": {"Content-Range": format!("bytes 0-99/{}", data.len())}}]),
    );
    let e = rt.block_on(c.blob_range(&r, &d, 1000, 100)).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("asked for bytes from 1000"), "{e}");
    // ...as is one without a Content-Range.
    proxy.set(json!([{"match": hex, "action": "body", "status": 206, "body": &text[..100]}]));
    let e = rt
        .block_on(read_all(&c, &r, &d, 1000, data.len() as u64))
        .unwrap_err();
    assert!(
        e.to_string().contains("Content-Range starting at None"),
        "{e}"
    );
}

#[test]
fn ranged_reads_share_the_token_cache() {
    let ta = TokenAuth::start("user:pass");
    push(&ta.registry, Some("user:pass"));
    ta.reset_stats();

    let c = RegistryClient::new(ClientOptions {
        plain_http: true,
        docker_config: false,
        creds: Credentials::parse("user:pass"),
        ..ClientOptions::default()
    })
    .unwrap();
    let r: Reference = format!("{}/busybox:latest", ta.registry).parse().unwrap();
    let rt = rt();
    let d = rt.block_on(async {
        let m = c.manifest(&r, "latest").await.unwrap();
        let m: ImageManifest = serde_json::from_slice(&m.bytes).unwrap();
        let layer = &m.layers()[0];
        let d = parse_digest(layer.digest().as_ref()).unwrap();
        let (whole, _) = read_all(&c, &r, &d, 0, layer.size()).await.unwrap();
        assert_eq!(whole.len() as u64, layer.size());
        for off in [0, 1, layer.size() / 2, layer.size() - 7] {
            let got = c.blob_range(&r, &d, off, 7).await.unwrap();
            assert!(got[..] == whole[off as usize..off as usize + 7], "{off}");
        }
        d
    });
    // One token for the manifest, the blob and every range.
    let stats = ta.stats();
    assert_eq!(stats["requests"], 1, "{stats}");

    // Without credentials a range is refused as unauthenticated.
    let anon = client();
    let e = rt.block_on(anon.blob_range(&r, &d, 0, 7)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
}

/// A relay to `upstream` that counts the TLS handshakes it is offered (a
/// ClientHello starts with 0x16) and closes them, as a plain-HTTP registry's
/// port does; everything else is passed through.
struct TlsCounter {
    addr: String,
    tls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsCounter {
    fn start(upstream: &str) -> TlsCounter {
        use std::io::copy;
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, upstream) = (tls.clone(), upstream.to_string());
        // Accepts until the test process exits (the port is its own).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut first = [0u8; 1];
                if conn.peek(&mut first).unwrap_or(0) == 0 {
                    continue;
                }
                if first[0] == 0x16 {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c1, mut u1) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
                let (mut c2, mut u2) = (conn, up);
                std::thread::spawn(move || {
                    let _ = copy(&mut c1, &mut u1);
                    let _ = u1.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
            }
        });
        TlsCounter { addr, tls }
    }

    fn tls_attempts(&self) -> usize {
        self.tls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Concurrent first requests to a plain-HTTP loopback registry: one of them
/// tries TLS and learns the host speaks HTTP; the others wait for that and
/// go straight to HTTP (no TLS attempt each, no retry's backoff), and later
/// requests never try TLS again.
#[test]
fn concurrent_first_requests_learn_a_loopback_registrys_scheme_once() {
    let reg = Registry::start(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = content(64 << 10);
    let d = rt.block_on(upload(&reg.addr, "t/scheme", &data));
    let relay = TlsCounter::start(&reg.addr);
    let r: Reference = format!("{}/t/scheme:x", relay.addr).parse().unwrap();
    let c = RegistryClient::new(ClientOptions {
        docker_config: false,
        // A loser's retry (the old race) would wait this long.
        backoff: Duration::from_secs(2),
        ..ClientOptions::default()
    })
    .unwrap();
    let read_all = |round: u64| {
        rt.block_on(futures_util::future::join_all(
            (0..8u64)
                .map(|i| {
                    let (c, r, d, data) = (&c, &r, &d, &data);
                    async move {
                        let off = (round * 8 + i) * 1000;
                        let got = c.blob_range(r, d, off, 1000).await.unwrap();
                        assert_eq!(&got[..], &data[off as usize..off as usize + 1000]);
                    }
                })
                .collect::<Vec<_>>(),
        ))
    };
    read_all(0);
    assert_eq!(
        relay.tls_attempts(),
        1,
        "one TLS attempt decides the scheme for all concurrent requests"
    );
    read_all(1);
    assert_eq!(relay.tls_attempts(), 1, "the scheme stays learned");
}
