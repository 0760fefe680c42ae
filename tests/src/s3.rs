//! S3 test peers: moto's S3 server on a free loopback port (killed on drop), or, when
//! `VMNEST_S3_ENDPOINT` names one (scripts/test-ceph.sh sets it to a Ceph RADOS Gateway), an
//! S3 server that is already running; helpers that create, list and damage objects through it;
//! and a fault-injecting HTTP proxy in front of either.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where scripts/install-test-deps.sh puts moto.
fn moto_dir() -> PathBuf {
    std::env::var_os("VMNEST_MOTO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vmnest-moto"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The access key the tests use. An external server (`VMNEST_S3_ENDPOINT`) must have a user
/// with these keys (scripts/test-ceph.sh creates it); moto accepts any.
pub const KEY: &str = "vmnest-test-key";
/// The secret key that goes with [`KEY`]; tests check that it never appears in any output.
pub const SECRET: &str = "vmnest-Secret-7Qz9xK2pL";

/// The S3 server of a test: moto started for it, or the external server of
/// `VMNEST_S3_ENDPOINT` (`http://127.0.0.1:PORT`), shared by every test of the run.
#[derive(Debug)]
pub struct Moto {
    _child: Option<crate::KilledOnDrop>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The port of the external S3 server named by `VMNEST_S3_ENDPOINT`, if any.
fn external_port() -> Option<u16> {
    let url = std::env::var("VMNEST_S3_ENDPOINT").ok()?;
    let port = url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok());
    Some(
        port.unwrap_or_else(|| {
            panic!("VMNEST_S3_ENDPOINT must be http://127.0.0.1:PORT, not {url}")
        }),
    )
}

impl Moto {
    /// Starts moto (scripts/s3-test-server.sh) on a free port and waits until it answers; fails
    /// the test when moto is not installed. With `VMNEST_S3_ENDPOINT` set, uses that server
    /// instead (boto3 from moto's environment still does the helpers' requests).
    pub fn start() -> Moto {
        if let Some(port) = external_port() {
            assert!(
                http(port, "GET", "/", &[]).is_ok(),
                "the S3 server of VMNEST_S3_ENDPOINT does not answer on port {port}"
            );
            return Moto { _child: None, port };
        }
        assert!(
            moto_dir().join("bin/moto_server").is_file(),
            "moto's S3 server is missing: run scripts/install-test-deps.sh"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-test-server.sh");
        let port = free_port();
        let child = Command::new("bash")
            .arg(&script)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto {
            _child: Some(crate::KilledOnDrop(child)),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/", &[]).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Whether this is an external server shared by the whole run.
    pub fn is_external(&self) -> bool {
        self._child.is_none()
    }

    /// Creates bucket `name` (on an external server: empty, whatever an earlier run left in it).
    pub fn bucket(&self, name: &str) {
        if self.is_external() {
            self.boto(
                "b = sys.argv[1]\n\
                 try:\n    s3.create_bucket(Bucket=b)\n\
                 except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):\n    pass\n\
                 for page in s3.get_paginator('list_objects_v2').paginate(Bucket=b):\n\
                 \x20   for o in page.get('Contents', []):\n\
                 \x20       s3.delete_object(Bucket=b, Key=o['Key'])",
                &[name],
            );
            return;
        }
        let (status, body) =
            http(self.port, "PUT", &format!("/{name}"), &[]).expect("create bucket");
        assert_eq!(
            status,
            200,
            "create bucket: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Keys under `prefix` in `bucket` (moto: one listing page, up to 1000).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        if self.is_external() {
            let out = self.boto(
                "for page in s3.get_paginator('list_objects_v2').paginate(\n\
                 \x20   Bucket=sys.argv[1], Prefix=sys.argv[2]):\n\
                 \x20   for o in page.get('Contents', []):\n\
                 \x20       print(o['Key'])",
                &[bucket, prefix],
            );
            return out.lines().map(str::to_string).collect();
        }
        let (status, body) = http(
            self.port,
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
            &[],
        )
        .expect("list");
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Moto {
    fn boto(&self, script: &str, args: &[&str]) -> String {
        let out = Command::new(moto_dir().join("bin/python"))
            .arg("-c")
            .arg(format!(
                "import sys, boto3\n\
                 s3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='{KEY}', \
                 aws_secret_access_key='{SECRET}', region_name='us-east-1')\n{script}",
                self.endpoint()
            ))
            .args(args)
            .output()
            .expect("run boto3");
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Downloads every object under `prefix` of `bucket` into directory `to` (created), each
    /// named by its key with `/` turned into `_` (through boto3: moto refuses unsigned GETs of
    /// objects, and other servers check signatures).
    pub fn download(&self, bucket: &str, prefix: &str, to: &Path) {
        std::fs::create_dir_all(to).expect("create the download directory");
        self.boto(
            "import os\n\
             for page in s3.get_paginator('list_objects_v2').paginate(\n\
             \x20   Bucket=sys.argv[1], Prefix=sys.argv[2]):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       body = s3.get_object(Bucket=sys.argv[1], Key=o['Key'])['Body'].read()\n\
             \x20       name = os.path.join(sys.argv[3], o['Key'].replace('/', '_'))\n\
             \x20       open(name, 'wb').write(body)",
            &[bucket, prefix, to.to_str().expect("a UTF-8 path")],
        );
    }

    /// The largest object under `prefix`.
    pub fn largest(&self, bucket: &str, prefix: &str) -> String {
        self.boto(
            "r = s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])\n\
             print(max(r['Contents'], key=lambda o: o['Size'])['Key'])",
            &[bucket, prefix],
        )
    }

    /// Flips one bit of byte `offset` of an object, through the S3 API (GET, PUT).
    pub fn flip_byte(&self, bucket: &str, key: &str, offset: usize) {
        self.boto(
            "b = bytearray(s3.get_object(Bucket=sys.argv[1], Key=sys.argv[2])['Body'].read())\n\
             b[int(sys.argv[3])] ^= 0x40\n\
             s3.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=bytes(b))",
            &[bucket, key, &offset.to_string()],
        );
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and body.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_with(port, method, path, "", body)
}

/// Like [`http`] with extra header lines (each ending in CRLF).
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let head_end = find(&resp, b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no head"))?;
    let head = String::from_utf8_lossy(&resp[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut body = resp[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = unchunk(&body);
    }
    Ok((status, body))
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What the proxy does to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering.
    Drop,
    /// Answer 500 Internal Error.
    Status500,
    /// Answer 503 SlowDown (S3's throttling answer).
    SlowDown,
    /// Answer nothing for this long, then close.
    Stall(Duration),
    /// Forward the request, then close without relaying the answer (the request took effect;
    /// the client cannot know).
    LoseAnswer,
}

/// A fault-injecting HTTP proxy in front of a server on loopback: the n-th request whose
/// method is in the plan gets that fault; every other request is forwarded (one upstream
/// connection per request, `Connection: close`).
#[derive(Debug)]
pub struct FaultProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Requests seen.
    pub requests: Arc<AtomicU64>,
    /// Faults injected.
    pub injected: Arc<AtomicU64>,
    /// The request line (`METHOD PATH HTTP/1.1`) of every request seen, in order.
    pub log: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

type Plan = Arc<Mutex<(u64, VecDeque<(u64, Fault)>)>>;

impl FaultProxy {
    /// Starts a proxy to `upstream`; `plan` lists (n, fault): the n-th (from 1) request with
    /// method `method` gets `fault`.
    pub fn start(upstream: u16, method: &'static str, plan: Vec<(u64, Fault)>) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let requests = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(AtomicU64::new(0));
        let plan: Plan = Arc::new(Mutex::new((0, plan.into_iter().collect())));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (r2, i2, l2) = (requests.clone(), injected.clone(), log.clone());
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (plan, r, i, l) = (plan.clone(), r2.clone(), i2.clone(), l2.clone());
                tokio::spawn(async move {
                    let _ = serve_conn(sock, upstream, method, plan, (r, i, l)).await;
                });
            }
        });
        FaultProxy {
            port,
            requests,
            injected,
            log,
            _rt: rt,
        }
    }

    /// How many requests seen so far have a request line starting with `method` and whose
    /// path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        let log = self.log.lock().expect("proxy log");
        log.iter()
            .filter(|l| {
                l.strip_prefix(method)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .is_some_and(|rest| rest.split(' ').next().unwrap_or("").contains(part))
            })
            .count()
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn read_request(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut tmp = vec![0u8; 1 << 16];
                let n = sock.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let req: Vec<u8> = buf.drain(..end + 4 + len).collect();
            return Ok(Some((head, req)));
        }
        let mut tmp = vec![0u8; 1 << 16];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn serve_conn(
    mut sock: tokio::net::TcpStream,
    upstream: u16,
    method: &str,
    plan: Plan,
    (requests, injected, log): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<Mutex<Vec<String>>>),
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    // One request per connection: every answer says Connection: close.
    if let Some((head, req)) = read_request(&mut sock, &mut buf).await? {
        requests.fetch_add(1, Ordering::Relaxed);
        let line = head.lines().next().unwrap_or("").to_string();
        log.lock().expect("proxy log").push(line);
        let fault = {
            let mut g = plan.lock().expect("plan lock");
            if head.starts_with(&format!("{method} ")) {
                g.0 += 1;
                let n = g.0;
                if g.1.front().is_some_and(|(at, _)| *at == n) {
                    g.1.pop_front().map(|(_, f)| f)
                } else {
                    None
                }
            } else {
                None
            }
        };
        if let Some(f) = fault {
            injected.fetch_add(1, Ordering::Relaxed);
            let answer = |code: &str, s3: &str| {
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{s3}</Code>\
                     <Message>injected</Message></Error>"
                );
                format!(
                    "HTTP/1.1 {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            match f {
                Fault::Drop => {}
                Fault::Status500 => {
                    sock.write_all(answer("500 Internal Server Error", "InternalError").as_bytes())
                        .await?
                }
                Fault::SlowDown => {
                    sock.write_all(answer("503 Slow Down", "SlowDown").as_bytes())
                        .await?
                }
                Fault::Stall(d) => tokio::time::sleep(d).await,
                Fault::LoseAnswer => {
                    forward(&req, upstream).await?;
                }
            }
            return Ok(());
        }
        let out = forward(&req, upstream).await?;
        sock.write_all(&out).await?;
    }
    Ok(())
}

/// Sends `req` upstream with `Connection: close`; returns the answer, also marked
/// `Connection: close`.
async fn forward(req: &[u8], upstream: u16) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head_end = find(req, b"\r\n\r\n").unwrap_or(req.len());
    let mut fwd = Vec::with_capacity(req.len() + 32);
    for line in String::from_utf8_lossy(&req[..head_end]).split("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        fwd.extend_from_slice(line.as_bytes());
        fwd.extend_from_slice(b"\r\n");
    }
    fwd.extend_from_slice(b"Connection: close\r\n\r\n");
    fwd.extend_from_slice(&req[(head_end + 4).min(req.len())..]);
    let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    up.write_all(&fwd).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    let resp_end = find(&resp, b"\r\n\r\n").unwrap_or(resp.len());
    let mut out = Vec::with_capacity(resp.len() + 32);
    for line in String::from_utf8_lossy(&resp[..resp_end]).split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&resp[(resp_end + 4).min(resp.len())..]);
    Ok(out)
}
