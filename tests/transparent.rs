//! Transparent mode end to end, in network namespaces this module creates:
//!
//! ```text
//!  client ns            router ns (chatwall, firewall recipe)        origin ns
//!  10.200.1.2  ── c0 ─ rc ── 10.200.1.1   10.200.2.1 ── ro ─ o0 ── 10.200.2.2 (+ .3: an "IM" address)
//!  fd00:c4a7::1:2         fd00:c4a7::1:1   fd00:c4a7::2:1          fd00:c4a7::2:2 (+ ::2:3)
//! ```
//!
//! The router runs the real `chatwall` binary and the shipped firewall
//! recipes (`docker/iptables.sh`, `docker/nftables.sh`), so the scripts are
//! tested with the proxy. The origin is a small Python server that logs every
//! accepted connection, request, received byte and datagram, so a test can
//! assert what did and did not reach it. Clients are curl and a Python
//! one-shot socket client, both run in the client namespace.
//!
//! All traffic stays inside these namespaces: 10.200.0.0/16 and
//! fd00:c4a7::/64 exist nowhere else, and the router has no default route.
//!
//! Needs root, iproute2, iptables, nftables, curl, openssl, python3 and
//! setpriv; without them each test prints why and skips, and fails under
//! `CHATWALL_REQUIRE_ALL=1` (CI). The tests take one global lock, so they
//! run one at a time whatever the harness's thread count; namespace names
//! carry the process id and the test's name, and a `Drop` guard kills the
//! processes and deletes the namespaces (and with them the veths) even when
//! a test fails.
use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{metric_value, skip_or_fail};

const CLIENT4: &str = "10.200.1.2";
const ROUTER_LAN4: &str = "10.200.1.1";
const ROUTER_WAN4: &str = "10.200.2.1";
const ORIGIN4: &str = "10.200.2.2";
/// A second origin address that the lab signature `lab-im` claims by CIDR.
const IM_ORIGIN4: &str = "10.200.2.3";
const CLIENT6: &str = "fd00:c4a7::1:2";
const ROUTER_LAN6: &str = "fd00:c4a7::1:1";
const ROUTER_WAN6: &str = "fd00:c4a7::2:1";
const ORIGIN6: &str = "fd00:c4a7::2:2";
const IM_ORIGIN6: &str = "fd00:c4a7::2:3";

const HTTP_PORT: u16 = 3129;
const TLS_PORT: u16 = 3130;
const OTHER_PORT: u16 = 3131;
/// chatwall's `[upstream] mark` in the mark-exemption cases, and the same
/// for the recipes' `--mark`.
const MARK: u32 = 42;
const MARK_ARG: &str = "42";
/// A port no signature claims, redirected like an IM port so that payload
/// signatures (not port rules) decide.
const LAB_PORT: u16 = 4000;
/// `--im-ports` for the recipes: two real IM ports and the lab port.
const IM_PORTS: &str = "5222,5050,4000";
/// The user chatwall runs as in the owner-exemption case (nobody).
const CHATWALL_UID: &str = "65534";

const WAIT: Duration = Duration::from_secs(10);
const SMALL: &[u8] = b"a small file from the origin\n";
const LARGE_LEN: usize = 32 << 20;

/// One lab at a time: the tests share nothing, but each starts several
/// processes and the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The origin: HTTP on 80, HTTPS on 443, raw TCP echo recorders and UDP
/// recorders, all dual-stack; one JSON line per event.
const ORIGIN_PY: &str = r#"
import argparse, http.server, json, os, socket, socketserver, ssl, threading

ap = argparse.ArgumentParser()
for a in ("--log", "--dir", "--cert", "--key", "--ready"):
    ap.add_argument(a, required=True)
ap.add_argument("--tcp", default="")
ap.add_argument("--udp", default="")
# Raw modes: these ports are served by the scripted HTTP responder or the
# echo recorder instead of the web servers (or the echo), so that every
# byte received and sent is logged.
ap.add_argument("--raw-http", default="")
ap.add_argument("--raw-echo", default="")
args = ap.parse_args()
lock = threading.Lock()
out = open(args.log, "a", buffering=1)

def log(**ev):
    with lock:
        out.write(json.dumps(ev) + "\n")
        out.flush()

def addr(a):
    host = a[0][7:] if a[0].startswith("::ffff:") else a[0]
    return "[%s]:%d" % (host, a[1]) if ":" in host else "%s:%d" % (host, a[1])

def dual(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def note(self):
        log(ev="request", port=self.server.port, method=self.command, path=self.path,
            host=self.headers.get("Host"), peer=addr(self.client_address),
            local=addr(self.connection.getsockname()))

    def do_GET(self):
        self.note()
        path = self.path.split("?")[0]
        if path.startswith("/files/"):
            p = os.path.join(args.dir, os.path.basename(path))
            if not os.path.isfile(p):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.path.getsize(p)))
            self.end_headers()
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 16)
                    if not b:
                        break
                    self.wfile.write(b)
            return
        body = b"hello from origin port %d\n" % self.server.port
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    tls = None

    def server_bind(self):
        # Not HTTPServer.server_bind: its getfqdn() would look names up.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name = "origin"
        self.server_port = self.port = self.server_address[1]

    def verify_request(self, request, client_address):
        log(ev="accept", port=self.port, peer=addr(client_address), local=addr(request.getsockname()))
        return True

    def process_request_thread(self, request, client_address):
        if self.tls is not None:
            try:
                request.settimeout(10)
                request = self.tls.wrap_socket(request, server_side=True)
            except Exception as e:
                log(ev="tls_error", port=self.port, peer=addr(client_address), error=str(e))
                request.close()
                return
        super().process_request_thread(request, client_address)

def raw_conn(s, port, peer):
    while True:
        try:
            b = s.recv(65536)
        except OSError as e:
            log(ev="close", port=port, peer=peer, how=str(e))
            break
        if not b:
            log(ev="close", port=port, peer=peer, how="eof")
            break
        log(ev="data", port=port, peer=peer, hex=b.hex())
        try:
            s.sendall(b)
        except OSError:
            pass
    s.close()

def scripted_http(s, port, peer):
    # Bodiless requests, pipelined or not: each complete head gets a fixed
    # answer with mixed-case names and no Date; "Connection: close" ends it.
    buf, n, done = b"", 0, False
    while not done:
        try:
            b = s.recv(65536)
        except OSError as e:
            log(ev="close", port=port, peer=peer, how=str(e))
            break
        if not b:
            log(ev="close", port=port, peer=peer, how="eof")
            break
        log(ev="data", port=port, peer=peer, hex=b.hex())
        buf += b
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            n += 1
            body = b"raw answer %d on port %d\n" % (n, port)
            resp = (b"HTTP/1.1 200 OK\r\nX-Raw-Origin: MiXeD-Case\r\ncontent-type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)) + body
            try:
                s.sendall(resp)
            except OSError:
                done = True
                break
            log(ev="sent", port=port, peer=peer, hex=resp.hex())
            if b"\r\nconnection: close" in head.lower():
                log(ev="close", port=port, peer=peer, how="server")
                done = True
                break
    s.close()

def raw_listener(port, serve=raw_conn):
    ls = dual(socket.SOCK_STREAM)
    ls.bind(("::", port))
    ls.listen(64)
    def loop():
        while True:
            s, a = ls.accept()
            log(ev="accept", port=port, peer=addr(a), local=addr(s.getsockname()))
            threading.Thread(target=serve, args=(s, port, addr(a)), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def udp_listener(port):
    us = dual(socket.SOCK_DGRAM)
    us.bind(("::", port))
    def loop():
        while True:
            b, a = us.recvfrom(65536)
            log(ev="udp", port=port, peer=addr(a), hex=b.hex())
    threading.Thread(target=loop, daemon=True).start()

raw_http = set(int(p) for p in filter(None, args.raw_http.split(",")))
raw_echo = set(int(p) for p in filter(None, args.raw_echo.split(",")))
servers = []
if not {80} & (raw_http | raw_echo):
    servers.append(Server(("::", 80), Handler))
if not {443} & (raw_http | raw_echo):
    tls = Server(("::", 443), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    tls.tls = ctx
    servers.append(tls)
tcp = set(int(p) for p in filter(None, args.tcp.split(",")))
for p in sorted((tcp | raw_echo) - raw_http):
    raw_listener(p)
for p in sorted(raw_http):
    raw_listener(p, scripted_http)
for p in filter(None, args.udp.split(",")):
    udp_listener(int(p))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
with open(args.ready, "w") as f:
    f.write("ready\n")
threading.Event().wait()
"#;

/// One TCP exchange (parts sent 300 ms apart, then read until EOF, reset,
/// `expect` bytes or `wait` seconds) or one UDP datagram; one JSON line.
const CLIENT_PY: &str = r#"
import json, socket, sys, time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = [bytes.fromhex(p) for p in sys.argv[4].split(",")]
wait = float(sys.argv[5]) if len(sys.argv) > 5 else 3.0
expect = int(sys.argv[6]) if len(sys.argv) > 6 else -1
if mode == "udp":
    u = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"".join(parts), (host, port))
    print(json.dumps({"connect": "udp", "recv": "", "end": "sent"}))
    sys.exit(0)
try:
    s = socket.create_connection((host, port), timeout=5)
except (ConnectionResetError, BrokenPipeError):
    print(json.dumps({"connect": "reset", "recv": "", "end": "reset"}))
    sys.exit(0)
except OSError as e:
    print(json.dumps({"connect": str(e), "recv": "", "end": "none"}))
    sys.exit(0)
got, end = b"", "timeout"
try:
    for i, p in enumerate(parts):
        if i:
            time.sleep(0.3)
        s.sendall(p)
except (ConnectionResetError, BrokenPipeError):
    end = "reset"
except OSError as e:
    end = "send: " + str(e)
deadline = time.monotonic() + wait
while end == "timeout":
    if expect >= 0 and len(got) >= expect:
        end = "complete"
        break
    left = deadline - time.monotonic()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        b = s.recv(65536)
    except ConnectionResetError:
        end = "reset"
        break
    except socket.timeout:
        break
    except OSError as e:
        end = str(e)
        break
    if not b:
        end = "eof"
        break
    got += b
print(json.dumps({"connect": "ok", "recv": got.hex(), "end": end}))
"#;

/// A signature file claiming the lab's "IM" addresses, so that the
/// original-destination check can be seen without any public address.
const LAB_IM_TOML: &str = r#"id = "lab-im"
name = "Lab IM"
category = "consumer-im"

[[cidrs]]
nets = ["10.200.2.3/32", "fd00:c4a7::2:3/128"]
source = "test fixture: the lab origin's second address"
"#;

/// An XMPP client stream header (RFC 6120 §4.7), in two segments that split
/// the signature's second atom's context.
const XMPP_PARTS: [&[u8]; 2] = [
    b"<?xml version='1.0'?><stream:stream to='example.com' xmlns=",
    b"'jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
];
/// A YMSG login header: "YMSG", version 16, length 0, service 0x57, in two
/// segments.
const YMSG_PARTS: [&[u8]; 2] = [
    b"YMSG",
    b"\x00\x10\x00\x00\x00\x00\x00\x57\x00\x00\x00\x00\x00\x00\x00\x00",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fw {
    Iptables,
    Nftables,
}

impl Fw {
    fn script(self) -> PathBuf {
        let name = match self {
            Fw::Iptables => "iptables.sh",
            Fw::Nftables => "nftables.sh",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docker")
            .join(name)
    }
}

/// What a command run in the lab gave back.
#[derive(Debug)]
struct Done {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// What curl got.
#[derive(Debug)]
struct Fetch {
    exit: Option<i32>,
    status: u16,
    headers: String,
    body: Vec<u8>,
    stderr: String,
}

impl Fetch {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the raw socket client saw.
#[derive(Debug)]
struct Raw {
    connect: String,
    received: Vec<u8>,
    end: String,
}

impl Raw {
    /// Reset by the proxy without a byte of answer.
    fn refused(&self) -> bool {
        self.received.is_empty() && self.end == "reset"
    }
}

struct ChatwallOpts<'a> {
    mark: u32,
    /// Addresses allowed besides the client subnets (local clients).
    extra_clients: &'a [&'a str],
    /// Run as this uid (setpriv) instead of root.
    uid: Option<&'a str>,
    /// `[upstream] parent`, if any.
    parent: Option<&'a str>,
}

impl Default for ChatwallOpts<'_> {
    fn default() -> Self {
        ChatwallOpts {
            mark: MARK,
            extra_clients: &[],
            uid: None,
            parent: None,
        }
    }
}

struct Lab {
    name: String,
    client: String,
    router: String,
    origin: String,
    dir: tempfile::TempDir,
    origin_proc: Option<Child>,
    chatwall: Option<Child>,
    runs: u32,
    seq: Cell<u32>,
    large_sha: String,
    _serial: MutexGuard<'static, ()>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex from the lab scripts"))
        .collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Run a short command outside the lab; its success.
fn quick(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine cannot run the lab, if it cannot.
fn missing(fw: Fw) -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("transparent mode needs Linux netfilter".into());
    }
    if !is_root() {
        return Some("needs root (network namespaces, iptables/nftables)".into());
    }
    let mut tools: Vec<(&str, &[&str])> = vec![
        ("ip", &["-V"]),
        ("curl", &["--version"]),
        ("openssl", &["version"]),
        ("python3", &["--version"]),
        ("setpriv", &["--version"]),
    ];
    match fw {
        Fw::Iptables => {
            tools.push(("iptables", &["--version"]));
            tools.push(("ip6tables", &["--version"]));
        }
        Fw::Nftables => tools.push(("nft", &["--version"])),
    }
    let absent: Vec<&str> = tools
        .iter()
        .filter(|(t, a)| !quick(t, a))
        .map(|(t, _)| *t)
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "missing tools: {} (apt-get install iproute2 iptables nftables curl openssl python3 util-linux)",
            absent.join(", ")
        ));
    }
    let probe = format!("cwt{}-probe", std::process::id());
    if !quick("ip", &["netns", "add", &probe]) {
        return Some("cannot create network namespaces (`ip netns add` failed)".into());
    }
    quick("ip", &["netns", "del", &probe]);
    None
}

/// Delete namespaces left by earlier runs of this suite whose process is
/// gone (killed before its Drop guards ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("cwt")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            quick("ip", &["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Build the three namespaces and start the origin; `None` (after the
    /// skip message) where the machine cannot.
    fn new(test: &str, fw: Fw) -> Option<Lab> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = missing(fw) {
            skip_or_fail(&format!("transparent::{test}: {why}"));
            return None;
        }
        sweep_stale();
        let name = format!("cwt{}-{test}", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lab = Lab {
            client: format!("{name}-c"),
            router: format!("{name}-r"),
            origin: format!("{name}-o"),
            name,
            dir,
            origin_proc: None,
            chatwall: None,
            runs: 0,
            seq: Cell::new(0),
            large_sha: String::new(),
            _serial: serial,
        };
        lab.build_network();
        lab.start_origin();
        Some(lab)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn next(&self) -> u32 {
        self.seq.set(self.seq.get() + 1);
        self.seq.get()
    }

    /// Run a command (in a namespace, or outside with `ns = None`), bounded
    /// by `limit`: killed and reported past it.
    fn exec(&self, ns: Option<&str>, args: &[&str], limit: Duration) -> Done {
        let n = self.next();
        let (out_path, err_path) = (
            self.path(&format!("cmd-{n}.out")),
            self.path(&format!("cmd-{n}.err")),
        );
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(args);
                c
            }
            None => {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("stdout file"))
            .stderr(fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        let deadline = Instant::now() + limit;
        let code = loop {
            match child.try_wait().expect("wait") {
                Some(s) => break s.code(),
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{args:?} in {ns:?} did not finish within {limit:?}");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Done {
            code,
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        }
    }

    /// A setup command that must succeed.
    fn must(&self, ns: Option<&str>, args: &[&str]) -> String {
        let d = self.exec(ns, args, WAIT);
        assert_eq!(
            d.code,
            Some(0),
            "{args:?} in {ns:?} failed: {}{}",
            d.stdout,
            d.stderr
        );
        d.stdout
    }

    fn build_network(&self) {
        let (c, r, o) = (
            self.client.as_str(),
            self.router.as_str(),
            self.origin.as_str(),
        );
        for ns in [c, r, o] {
            quick("ip", &["netns", "del", ns]);
            self.must(None, &["ip", "netns", "add", ns]);
            self.must(None, &["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // The veths are created inside the namespaces: nothing appears in
        // the host's namespace, and deleting a namespace deletes its ends.
        self.must(
            None,
            &[
                "ip", "-n", r, "link", "add", "rc", "type", "veth", "peer", "name", "c0", "netns",
                c,
            ],
        );
        self.must(
            None,
            &[
                "ip", "-n", r, "link", "add", "ro", "type", "veth", "peer", "name", "o0", "netns",
                o,
            ],
        );
        let addrs: &[(&str, &str, &str)] = &[
            (c, "c0", "10.200.1.2/24"),
            (c, "c0", "fd00:c4a7::1:2/112"),
            (r, "rc", "10.200.1.1/24"),
            (r, "rc", "fd00:c4a7::1:1/112"),
            (r, "ro", "10.200.2.1/24"),
            (r, "ro", "fd00:c4a7::2:1/112"),
            (o, "o0", "10.200.2.2/24"),
            (o, "o0", "10.200.2.3/24"),
            (o, "o0", "fd00:c4a7::2:2/112"),
            (o, "o0", "fd00:c4a7::2:3/112"),
        ];
        for (ns, dev, a) in addrs {
            let mut args = vec!["ip", "-n", ns, "addr", "add", a, "dev", dev];
            if a.contains(':') {
                args.push("nodad");
            }
            self.must(None, &args);
        }
        for (ns, dev) in [(c, "c0"), (r, "rc"), (r, "ro"), (o, "o0")] {
            self.must(None, &["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        self.must(
            None,
            &["ip", "-n", c, "route", "add", "default", "via", ROUTER_LAN4],
        );
        self.must(
            None,
            &[
                "ip",
                "-n",
                c,
                "-6",
                "route",
                "add",
                "default",
                "via",
                ROUTER_LAN6,
            ],
        );
        self.must(
            None,
            &["ip", "-n", o, "route", "add", "default", "via", ROUTER_WAN4],
        );
        self.must(
            None,
            &[
                "ip",
                "-n",
                o,
                "-6",
                "route",
                "add",
                "default",
                "via",
                ROUTER_WAN6,
            ],
        );
        self.must(
            Some(r),
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
    }

    fn start_origin(&mut self) {
        let files = self.path("files");
        fs::create_dir_all(&files).expect("files dir");
        fs::write(files.join("small.txt"), SMALL).expect("small file");
        // A large body of pseudo-random bytes (xorshift64*), hashed as written.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut large = Vec::with_capacity(LARGE_LEN);
        while large.len() < LARGE_LEN {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            large.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        self.large_sha = sha256(&large);
        fs::write(files.join("large.bin"), &large).expect("large file");
        fs::write(self.path("origin.py"), ORIGIN_PY).expect("origin.py");
        fs::write(self.path("client.py"), CLIENT_PY).expect("client.py");
        let (cert, key) = (self.path("cert.pem"), self.path("key.pem"));
        self.must(
            None,
            &[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=www.example.test",
                "-addext",
                "subjectAltName=DNS:www.example.test,DNS:web.whatsapp.com",
                "-keyout",
                key.to_str().expect("utf-8 path"),
                "-out",
                cert.to_str().expect("utf-8 path"),
            ],
        );
        let ready = self.path("origin.ready");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.origin, "python3"])
            .arg(self.path("origin.py"))
            .arg("--log")
            .arg(self.path("origin.jsonl"))
            .arg("--dir")
            .arg(&files)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--ready")
            .arg(&ready)
            .args(["--tcp", "5222,5050,4000", "--udp", "80,443,9999"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("origin.out")).expect("origin.out"))
            .stderr(fs::File::create(self.path("origin.err")).expect("origin.err"))
            .spawn()
            .expect("start the origin");
        self.origin_proc = Some(child);
        let deadline = Instant::now() + WAIT;
        while !ready.exists() {
            if let Some(s) = self
                .origin_proc
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "origin exited ({s}): {}",
                    fs::read_to_string(self.path("origin.err")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "origin not ready within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The firewall recipe in the router namespace: `args` then the action.
    fn recipe(&self, fw: Fw, args: &[&str]) -> Done {
        let script = fw.script();
        let mut all = vec!["bash", script.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        self.exec(Some(&self.router), &all, Duration::from_secs(30))
    }

    fn apply(&self, fw: Fw, args: &[&str]) {
        let mut all = args.to_vec();
        all.push("apply");
        let d = self.recipe(fw, &all);
        assert_eq!(
            d.code,
            Some(0),
            "{fw:?} recipe {all:?} failed: {}{}",
            d.stdout,
            d.stderr
        );
    }

    /// chatwall in the router namespace, the real binary; waits for /readyz.
    fn start_chatwall(&mut self, opts: ChatwallOpts<'_>) {
        self.stop_chatwall();
        self.runs += 1;
        let sigs = self.path("signatures");
        if !sigs.exists() {
            fs::create_dir_all(&sigs).expect("signatures dir");
            let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("signatures");
            for e in fs::read_dir(&bundled)
                .expect("bundled signatures")
                .flatten()
            {
                fs::copy(e.path(), sigs.join(e.file_name())).expect("copy signature");
            }
            fs::write(sigs.join("lab-im.toml"), LAB_IM_TOML).expect("lab-im.toml");
        }
        let log = self.path("access.log");
        if !log.exists() {
            fs::write(&log, "").expect("access log");
        }
        let mut clients = vec!["10.200.1.0/24", "fd00:c4a7::1:0/112"];
        clients.extend_from_slice(opts.extra_clients);
        let config = format!(
            "[listen]\n\
             explicit = [\"127.0.0.1:3128\"]\n\
             transparent_http = [\"0.0.0.0:{HTTP_PORT}\", \"[::]:{HTTP_PORT}\"]\n\
             transparent_tls = [\"0.0.0.0:{TLS_PORT}\", \"[::]:{TLS_PORT}\"]\n\
             transparent = [\"0.0.0.0:{OTHER_PORT}\", \"[::]:{OTHER_PORT}\"]\n\
             admin = \"127.0.0.1:9128\"\n\n\
             [signatures]\ndir = {:?}\n\n\
             [access]\nallow_clients = {:?}\n\n\
             [log]\naccess = {:?}\nformat = \"json\"\nlevel = \"info\"\n\n\
             [upstream]\nmark = {}\n",
            sigs.display().to_string(),
            clients,
            log.display().to_string(),
            opts.mark,
        );
        let mut config = config;
        if let Some(parent) = opts.parent {
            config.push_str(&format!("parent = {parent:?}\n"));
        }
        let config_path = self.path(&format!("chatwall-{}.toml", self.runs));
        fs::write(&config_path, config).expect("config");
        if opts.uid.is_some() {
            // Everything chatwall reads or writes, readable by its user.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755))
                .expect("chmod dir");
            fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).expect("chmod log");
        }
        let bin = env!("CARGO_BIN_EXE_chatwall");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.router]);
        if let Some(uid) = opts.uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        cmd.arg(bin).arg("run").arg("-c").arg(&config_path);
        let err_path = self.path(&format!("chatwall-{}.err", self.runs));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(
                fs::File::create(self.path(&format!("chatwall-{}.out", self.runs))).expect("out"),
            )
            .stderr(fs::File::create(&err_path).expect("err"))
            .spawn()
            .expect("start chatwall");
        self.chatwall = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self
                .chatwall
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "chatwall exited ({s}): {}",
                    fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            let d = self.exec(
                Some(&self.router),
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:9128/readyz",
                ],
                Duration::from_secs(5),
            );
            if d.stdout == "200" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chatwall not ready within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_chatwall(&mut self) {
        if let Some(mut c) = self.chatwall.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// curl in a namespace; `--noproxy '*'` so no proxy variable interferes.
    fn curl(&self, ns: &str, args: &[&str]) -> Fetch {
        let n = self.next();
        let (h, b) = (
            self.path(&format!("curl-{n}.head")),
            self.path(&format!("curl-{n}.body")),
        );
        let (hs, bs) = (h.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
        let mut all = vec![
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-D",
            hs,
            "-o",
            bs,
            "-w",
            "%{http_code}",
        ];
        all.extend_from_slice(args);
        let d = self.exec(Some(ns), &all, Duration::from_secs(30));
        Fetch {
            exit: d.code,
            status: d.stdout.trim().parse().unwrap_or(0),
            headers: fs::read_to_string(&h).unwrap_or_default(),
            body: fs::read(&b).unwrap_or_default(),
            stderr: d.stderr,
        }
    }

    /// `http://NAME/PATH` from the client, NAME pinned to `ip` (no DNS).
    fn get(&self, ns: &str, scheme: &str, name: &str, ip: &str, path: &str) -> Fetch {
        let port = if scheme == "https" { 443 } else { 80 };
        let pin = if ip.contains(':') {
            format!("{name}:{port}:[{ip}]")
        } else {
            format!("{name}:{port}:{ip}")
        };
        let cert = self.path("cert.pem");
        let url = format!("{scheme}://{name}{path}");
        self.curl(
            ns,
            &[
                "--cacert",
                cert.to_str().expect("utf-8"),
                "--resolve",
                &pin,
                &url,
            ],
        )
    }

    /// One raw TCP exchange from the client namespace.
    fn tcp(&self, ip: &str, port: u16, parts: &[&[u8]], wait: f64, expect: Option<usize>) -> Raw {
        let parts: Vec<String> = parts.iter().map(|p| hex(p)).collect();
        let (port, wait, expect) = (
            port.to_string(),
            wait.to_string(),
            expect.map_or(-1, |e| e as i64).to_string(),
        );
        let script = self.path("client.py");
        let d = self.exec(
            Some(&self.client),
            &[
                "python3",
                script.to_str().expect("utf-8"),
                "tcp",
                ip,
                &port,
                &parts.join(","),
                &wait,
                &expect,
            ],
            Duration::from_secs(30),
        );
        let v: Value = serde_json::from_str(d.stdout.trim())
            .unwrap_or_else(|e| panic!("client output {:?} {:?}: {e}", d.stdout, d.stderr));
        Raw {
            connect: v["connect"].as_str().unwrap_or_default().to_string(),
            received: unhex(v["recv"].as_str().unwrap_or_default()),
            end: v["end"].as_str().unwrap_or_default().to_string(),
        }
    }

    fn udp(&self, ip: &str, port: u16, payload: &[u8]) {
        let script = self.path("client.py");
        self.must(
            Some(&self.client),
            &[
                "python3",
                script.to_str().expect("utf-8"),
                "udp",
                ip,
                &port.to_string(),
                &hex(payload),
            ],
        );
    }

    /// Every event the origin logged so far.
    fn origin_events(&self) -> Vec<Value> {
        fs::read_to_string(self.path("origin.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events after the first `since`.
    fn origin_since(&self, since: usize) -> Vec<Value> {
        self.origin_events().into_iter().skip(since).collect()
    }

    /// The origin request events for a path, waiting (bounded) for `n`.
    fn origin_requests(&self, path: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let r: Vec<Value> = self
                .origin_events()
                .into_iter()
                .filter(|e| e["ev"] == "request" && e["path"] == path)
                .collect();
            if r.len() >= n || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn records(&self) -> Vec<Value> {
        fs::read_to_string(self.path("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first access-log record after `since` that `pred` accepts,
    /// waiting for it (bounded).
    fn record(&self, since: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.records().into_iter().skip(since).find(&pred) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no access-log record for {what} within {WAIT:?}; records: {:#?}",
                self.records().into_iter().skip(since).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> String {
        self.must(
            Some(&self.router),
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://127.0.0.1:9128/metrics",
            ],
        )
    }

    /// Let anything in flight land before asserting that nothing did.
    fn settle(&self) {
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = |name: &str| {
                let t = fs::read_to_string(self.path(name)).unwrap_or_default();
                let start = t.len().saturating_sub(6000);
                t.get(start..).unwrap_or_default().to_string()
            };
            eprintln!(
                "---- lab {} failed; chatwall stderr (last run):\n{}",
                self.name,
                tail(&format!("chatwall-{}.err", self.runs))
            );
            eprintln!("---- access log:\n{}", tail("access.log"));
            eprintln!("---- origin log:\n{}", tail("origin.jsonl"));
            for args in [
                ["iptables-save"].as_slice(),
                &["ip6tables-save"],
                &["nft", "list", "ruleset"],
            ] {
                if let Ok(o) = Command::new("ip")
                    .args(["netns", "exec", &self.router])
                    .args(args)
                    .output()
                {
                    eprintln!(
                        "---- router {}:\n{}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stdout)
                    );
                }
            }
        }
        for mut c in [self.chatwall.take(), self.origin_proc.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.client, &self.router, &self.origin] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The recipe options every case uses: the lab's IM ports, and the mark
/// exemption for chatwall's own connections.
fn base_args() -> Vec<&'static str> {
    vec!["--im-ports", IM_PORTS, "--mark", MARK_ARG]
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// verdict, app, reason and listener of a record.
fn assert_record(
    r: &Value,
    verdict: &str,
    app: Option<&str>,
    reason: Option<&str>,
    listener: &str,
) {
    assert_eq!(s(r, "verdict"), verdict, "verdict of {r}");
    assert_eq!(r["app"].as_str(), app, "app of {r}");
    assert_eq!(r["reason"].as_str(), reason, "reason of {r}");
    assert_eq!(s(r, "listener"), listener, "listener of {r}");
}

/// No event at the origin on `port` (no connection accepted, no byte, no
/// datagram) among `events`.
fn assert_untouched(events: &[Value], port: u16, what: &str) {
    let hits: Vec<&Value> = events.iter().filter(|e| e["port"] == port).collect();
    assert!(hits.is_empty(), "{what}: the origin saw {hits:#?}");
}

/// The origin received no byte on `port` among `events` (a connection may
/// have been accepted: chatwall connects first on generic ports).
fn assert_no_data(events: &[Value], port: u16, what: &str) {
    let data: Vec<&Value> = events
        .iter()
        .filter(|e| e["port"] == port && e["ev"] == "data")
        .collect();
    assert!(data.is_empty(), "{what}: the origin received {data:#?}");
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// The IPv4 or IPv6 address set of one family.
struct Family {
    origin: &'static str,
    router_lan: &'static str,
    router_wan: &'static str,
    client: &'static str,
}

const V4: Family = Family {
    origin: ORIGIN4,
    router_lan: ROUTER_LAN4,
    router_wan: ROUTER_WAN4,
    client: CLIENT4,
};
const V6: Family = Family {
    origin: ORIGIN6,
    router_lan: ROUTER_LAN6,
    router_wan: ROUTER_WAN6,
    client: CLIENT6,
};

// ---- shared cases, run by several tests (families, firewalls) ----------

/// Ordinary HTTP through the transparent HTTP listener: byte-exact, to the
/// original destination, with the client's Host header.
fn case_http_passes(lab: &Lab, f: &Family, large: bool) {
    let since = lab.records().len();
    let path = format!("/files/small.txt?http-{}", lab.next());
    let r = lab.get(&lab.client, "http", "www.example.test", f.origin, &path);
    assert_eq!((r.exit, r.status), (Some(0), 200), "{r:?}");
    assert_eq!(r.body, SMALL, "small body byte-exact");
    let seen = lab.origin_requests(&path, 1);
    assert_eq!(seen.len(), 1, "the origin saw the request once: {seen:#?}");
    assert_eq!(s(&seen[0], "host"), "www.example.test", "Host header kept");
    assert_eq!(
        s(&seen[0], "local"),
        format!("{}:80", bracket(f.origin)),
        "sent to the original destination"
    );
    assert!(
        s(&seen[0], "peer").starts_with(&bracket(f.router_wan)),
        "came from chatwall on the router, not straight from the client: {}",
        seen[0]
    );
    let rec = lab.record(since, "allowed GET", |r| {
        r["method"] == "GET" && s(r, "target") == path
    });
    assert_record(&rec, "allow", None, None, "transparent_http");
    assert_eq!(n(&rec, "status"), 200);
    assert_eq!(s(&rec, "host"), "www.example.test");
    assert!(
        s(&rec, "client").starts_with(&bracket(f.client)),
        "client of {rec}"
    );
    assert_eq!(
        n(&rec, "bytes_down"),
        SMALL.len() as u64,
        "bytes_down of {rec}"
    );

    if large {
        let since = lab.records().len();
        let r = lab.get(
            &lab.client,
            "http",
            "www.example.test",
            f.origin,
            "/files/large.bin?http",
        );
        assert_eq!((r.exit, r.status), (Some(0), 200), "{}", r.stderr);
        assert_eq!(r.body.len(), LARGE_LEN, "large body length");
        assert_eq!(sha256(&r.body), lab.large_sha, "large body byte-exact");
        let rec = lab.record(since, "large GET", |r| {
            r["method"] == "GET" && n(r, "status") == 200
        });
        assert_eq!(
            n(&rec, "bytes_down"),
            LARGE_LEN as u64,
            "bytes_down of {rec}"
        );
    }
}

/// An IM name in the Host header: the 403 page, and nothing reaches the
/// origin.
fn case_http_im_host(lab: &Lab, f: &Family) {
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(&lab.client, "http", "web.whatsapp.com", f.origin, "/");
    assert_eq!((r.exit, r.status), (Some(0), 403), "{r:?}");
    assert_eq!(
        r.header("x-chatwall-block").as_deref(),
        Some("whatsapp"),
        "{}",
        r.headers
    );
    assert!(
        r.text().to_lowercase().contains("whatsapp"),
        "the page names the app: {}",
        r.text()
    );
    let rec = lab.record(since, "Host refusal", |r| r["method"] == "GET");
    assert_record(
        &rec,
        "block",
        Some("whatsapp"),
        Some("host"),
        "transparent_http",
    );
    assert_eq!(n(&rec, "status"), 403);
    assert_eq!(s(&rec, "host"), "web.whatsapp.com");
    lab.settle();
    assert_untouched(&lab.origin_since(events), 80, "Host refusal");
}

/// Ordinary HTTPS: byte-exact through the TLS listener, ClientHello replayed.
fn case_tls_passes(lab: &Lab, f: &Family, large: bool) {
    let since = lab.records().len();
    let path = format!("/hello?tls-{}", lab.next());
    let r = lab.get(&lab.client, "https", "www.example.test", f.origin, &path);
    assert_eq!((r.exit, r.status), (Some(0), 200), "{r:?}");
    assert_eq!(r.text(), "hello from origin port 443\n");
    let seen = lab.origin_requests(&path, 1);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        s(&seen[0], "peer").starts_with(&bracket(f.router_wan)),
        "{}",
        seen[0]
    );
    assert_eq!(s(&seen[0], "local"), format!("{}:443", bracket(f.origin)));
    let rec = lab.record(since, "allowed TLS", |r| r["listener"] == "transparent_tls");
    assert_record(&rec, "allow", None, None, "transparent_tls");
    assert_eq!(s(&rec, "sni"), "www.example.test");
    assert_eq!(s(&rec, "target"), format!("{}:443", bracket(f.origin)));
    if large {
        let r = lab.get(
            &lab.client,
            "https",
            "www.example.test",
            f.origin,
            "/files/large.bin?tls",
        );
        assert_eq!((r.exit, r.status), (Some(0), 200), "{}", r.stderr);
        assert_eq!(r.body.len(), LARGE_LEN);
        assert_eq!(
            sha256(&r.body),
            lab.large_sha,
            "large body byte-exact over TLS"
        );
    }
}

/// An IM name in the SNI: reset before the origin sees a connection.
fn case_tls_im_sni(lab: &Lab, f: &Family) {
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(&lab.client, "https", "web.whatsapp.com", f.origin, "/");
    assert_ne!(r.exit, Some(0), "the handshake must fail: {r:?}");
    assert_eq!(r.status, 0, "{r:?}");
    let rec = lab.record(since, "SNI refusal", |r| r["listener"] == "transparent_tls");
    assert_record(
        &rec,
        "block",
        Some("whatsapp"),
        Some("sni"),
        "transparent_tls",
    );
    assert_eq!(s(&rec, "sni"), "web.whatsapp.com");
    assert_eq!(n(&rec, "bytes_up"), 0, "{rec}");
    lab.settle();
    assert_untouched(
        &lab.origin_since(events),
        443,
        "SNI refusal (not even a TCP connection)",
    );
}

/// IM ports: refused on the port rule before any upstream connection.
fn case_im_ports(lab: &Lab, f: &Family) {
    for (port, parts, app) in [
        (5222u16, &XMPP_PARTS, "xmpp"),
        (5050, &YMSG_PARTS, "yahoo-messenger"),
    ] {
        let (since, events) = (lab.records().len(), lab.origin_events().len());
        let raw = lab.tcp(f.origin, port, parts, 3.0, None);
        assert!(raw.refused(), "port {port}: {raw:?}");
        let rec = lab.record(since, "port refusal", |r| r["listener"] == "transparent");
        assert_record(&rec, "block", Some(app), Some("port"), "transparent");
        assert_eq!(s(&rec, "target"), format!("{}:{port}", bracket(f.origin)));
        lab.settle();
        assert_untouched(&lab.origin_since(events), port, "port refusal");
    }
}

/// IM payloads on a redirected port no port rule claims: reset, and not a
/// byte reaches the origin even when the signature spans two segments;
/// anything else passes byte-exact both ways.
fn case_payloads(lab: &Lab, f: &Family) {
    for (parts, app) in [(&YMSG_PARTS, "yahoo-messenger"), (&XMPP_PARTS, "xmpp")] {
        let (since, events) = (lab.records().len(), lab.origin_events().len());
        let raw = lab.tcp(f.origin, LAB_PORT, parts, 3.0, None);
        assert!(raw.refused(), "{app} payload: {raw:?}");
        let rec = lab.record(since, "payload refusal", |r| r["listener"] == "transparent");
        assert_record(&rec, "block", Some(app), Some("payload"), "transparent");
        lab.settle();
        assert_no_data(
            &lab.origin_since(events),
            LAB_PORT,
            &format!("{app} payload refusal"),
        );
    }
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let raw = lab.tcp(
        f.origin,
        LAB_PORT,
        &[b"HELO lab\r\n", &payload],
        5.0,
        Some(payload.len() + 10),
    );
    let mut sent = b"HELO lab\r\n".to_vec();
    sent.extend_from_slice(&payload);
    assert_eq!(raw.end, "complete", "{}", raw.connect);
    assert_eq!(raw.received, sent, "echo byte-exact");
    let rec = lab.record(since, "allowed tunnel", |r| r["listener"] == "transparent");
    assert_record(&rec, "allow", None, None, "transparent");
    let got: Vec<u8> = lab
        .origin_since(events)
        .iter()
        .filter(|e| e["port"] == LAB_PORT && e["ev"] == "data")
        .flat_map(|e| unhex(e["hex"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(got, sent, "the origin received the bytes exactly");
}

/// A client connecting straight to a transparent listener (its original
/// destination is chatwall itself) is refused: no loop.
fn case_self_connect(lab: &Lab, f: &Family) {
    for (port, listener) in [
        (HTTP_PORT, "transparent_http"),
        (TLS_PORT, "transparent_tls"),
        (OTHER_PORT, "transparent"),
    ] {
        let (since, events) = (lab.records().len(), lab.origin_events().len());
        let raw = lab.tcp(
            f.router_lan,
            port,
            &[b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n"],
            3.0,
            None,
        );
        assert!(raw.refused(), "direct connection to {port}: {raw:?}");
        let target = format!("{}:{port}", bracket(f.router_lan));
        let rec = lab.record(since, "self refusal", |r| s(r, "target") == target);
        assert_record(&rec, "block", None, Some("destination"), listener);
        lab.settle();
        assert!(
            lab.origin_since(events).is_empty(),
            "nothing reached the origin"
        );
    }
}

/// UDP 80 and 443 (QUIC) are dropped for forwarded clients; other UDP passes.
fn case_quic_dropped(lab: &Lab, f: &Family) {
    let events = lab.origin_events().len();
    let tag = format!("quic-{}", lab.next());
    lab.udp(f.origin, 443, tag.as_bytes());
    lab.udp(f.origin, 80, tag.as_bytes());
    lab.udp(f.origin, 9999, tag.as_bytes());
    let deadline = Instant::now() + WAIT;
    while !lab
        .origin_since(events)
        .iter()
        .any(|e| e["ev"] == "udp" && e["port"] == 9999)
    {
        assert!(
            Instant::now() < deadline,
            "UDP 9999 never arrived: the lab is broken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.settle();
    let udp: Vec<Value> = lab
        .origin_since(events)
        .into_iter()
        .filter(|e| e["ev"] == "udp" && (e["port"] == 443 || e["port"] == 80))
        .collect();
    assert!(udp.is_empty(), "UDP 80/443 must be dropped: {udp:#?}");
}

/// A client on the router itself (OUTPUT chain): proxied like a forwarded
/// one, and chatwall's own upstream connection reaches the origin once.
fn case_local_client(lab: &Lab, f: &Family) {
    let since = lab.records().len();
    let path = format!("/files/small.txt?local-{}", lab.next());
    let r = lab.get(&lab.router, "http", "www.example.test", f.origin, &path);
    assert_eq!((r.exit, r.status), (Some(0), 200), "{r:?}");
    assert_eq!(r.body, SMALL);
    let rec = lab.record(since, "local GET", |r| {
        r["method"] == "GET" && s(r, "target") == path
    });
    assert_record(&rec, "allow", None, None, "transparent_http");
    assert!(
        s(&rec, "client").starts_with(&bracket(f.router_wan)),
        "a local client: {rec}"
    );
    lab.settle();
    let gets: Vec<Value> = lab
        .records()
        .into_iter()
        .skip(since)
        .filter(|r| r["method"] == "GET")
        .collect();
    assert_eq!(
        gets.len(),
        1,
        "one request, one record (no loop through chatwall): {gets:#?}"
    );
    assert_eq!(
        lab.origin_requests(&path, 1).len(),
        1,
        "the origin saw it once"
    );

    let since = lab.records().len();
    let r = lab.get(&lab.router, "http", "web.whatsapp.com", f.origin, "/?local");
    assert_eq!(r.status, 403, "{r:?}");
    let rec = lab.record(since, "local refusal", |r| r["method"] == "GET");
    assert_record(
        &rec,
        "block",
        Some("whatsapp"),
        Some("host"),
        "transparent_http",
    );

    let r = lab.get(
        &lab.router,
        "https",
        "www.example.test",
        f.origin,
        "/hello?local-tls",
    );
    assert_eq!((r.exit, r.status), (Some(0), 200), "{r:?}");
    assert_eq!(r.text(), "hello from origin port 443\n");
}

// ---- tests --------------------------------------------------------------

#[test]
fn http_passes_byte_exact_to_the_original_destination() {
    let Some(mut lab) = Lab::new("http-pass", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_http_passes(&lab, &V4, true);

    // The Host header names the site, the original destination is where
    // the request goes: "localhost" would resolve to a denied address.
    let events = lab.origin_events().len();
    let r = lab.curl(
        &lab.client,
        &[
            "-H",
            "Host: localhost",
            &format!("http://{ORIGIN4}/hello?host"),
        ],
    );
    assert_eq!((r.exit, r.status), (Some(0), 200), "{r:?}");
    assert_eq!(r.text(), "hello from origin port 80\n");
    let seen: Vec<Value> = lab
        .origin_since(events)
        .into_iter()
        .filter(|e| e["ev"] == "request")
        .collect();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(s(&seen[0], "host"), "localhost");
    assert_eq!(s(&seen[0], "local"), format!("{ORIGIN4}:80"));

    // Each request of a connection is decided on its own: the second,
    // pipelined after the first, names an IM host.
    let events = lab.origin_events().len();
    let pipelined: &[u8] = b"GET /hello?first HTTP/1.1\r\nHost: www.example.test\r\n\r\n\
GET /hello?second HTTP/1.1\r\nHost: web.whatsapp.com\r\nConnection: close\r\n\r\n";
    let raw = lab.tcp(ORIGIN4, 80, &[pipelined], 5.0, None);
    let text = String::from_utf8_lossy(&raw.received).to_lowercase();
    let (ok, refused) = (text.find("http/1.1 200"), text.find("http/1.1 403"));
    assert!(
        ok.is_some() && refused.is_some() && ok < refused,
        "200 then 403: {text}"
    );
    assert!(text.contains("hello from origin port 80"), "{text}");
    assert!(text.contains("x-chatwall-block: whatsapp"), "{text}");
    let seen: Vec<Value> = lab
        .origin_since(events)
        .into_iter()
        .filter(|e| e["ev"] == "request")
        .collect();
    assert_eq!(
        seen.len(),
        1,
        "only the first request reached the origin: {seen:#?}"
    );
    assert_eq!(s(&seen[0], "path"), "/hello?first");
}

#[test]
fn http_im_host_and_non_http_on_80_are_refused() {
    let Some(mut lab) = Lab::new("http-refuse", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_http_im_host(&lab, &V4);
    let m = lab.metrics();
    assert_eq!(
        metric_value(
            &m,
            "chatwall_blocked_total{app=\"whatsapp\",reason=\"host\"}"
        ),
        1.0,
        "{m}"
    );

    // Not HTTP on port 80: non_http_on_80 = block (the default).
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let raw = lab.tcp(
        ORIGIN4,
        80,
        &[b"\x00\x01\x02\x03 not http at all\r\n"],
        3.0,
        None,
    );
    assert!(raw.refused(), "{raw:?}");
    let rec = lab.record(since, "non-HTTP refusal", |r| {
        r["listener"] == "transparent_http"
    });
    assert_record(
        &rec,
        "block",
        Some("unidentified"),
        Some("non_http"),
        "transparent_http",
    );
    lab.settle();
    assert_untouched(&lab.origin_since(events), 80, "non-HTTP on 80");
}

/// The refusal table of DESIGN.md: "transparent HTTP | the same 403 page",
/// also when the original destination address (not the Host) is the IM
/// service's.
#[test]
fn http_to_an_im_address_gets_the_403_page() {
    let Some(mut lab) = Lab::new("http-imaddr", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(&lab.client, "http", "www.example.test", IM_ORIGIN4, "/");
    let rec = lab.record(since, "address refusal", |r| {
        r["listener"] == "transparent_http"
    });
    assert_eq!(s(&rec, "verdict"), "block", "{rec}");
    assert_eq!(s(&rec, "app"), "lab-im", "{rec}");
    assert_eq!(s(&rec, "reason"), "ip", "{rec}");
    lab.settle();
    assert!(
        lab.origin_since(events).is_empty(),
        "nothing reached the IM address: {:#?}",
        lab.origin_since(events)
    );
    assert_eq!(
        (r.exit, r.status, r.header("x-chatwall-block")),
        (Some(0), 403, Some("lab-im".to_string())),
        "a transparent HTTP client refused on its original destination gets the 403 page, not a reset: {r:?}"
    );
}

#[test]
fn tls_passes_byte_exact_and_im_sni_is_reset_before_the_upstream() {
    let Some(mut lab) = Lab::new("tls", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_tls_passes(&lab, &V4, true);
    case_tls_im_sni(&lab, &V4);

    // Not TLS on 443: non_tls_on_443 = block (the default).
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let raw = lab.tcp(
        ORIGIN4,
        443,
        &[b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n"],
        3.0,
        None,
    );
    assert!(raw.refused(), "{raw:?}");
    let rec = lab.record(since, "non-TLS refusal", |r| {
        r["listener"] == "transparent_tls"
    });
    assert_record(
        &rec,
        "block",
        Some("unidentified"),
        Some("non_tls"),
        "transparent_tls",
    );
    lab.settle();
    assert_untouched(&lab.origin_since(events), 443, "non-TLS on 443");

    // TLS to an IM address: reset on the original destination alone.
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(&lab.client, "https", "www.example.test", IM_ORIGIN4, "/");
    assert_ne!(r.exit, Some(0), "{r:?}");
    let rec = lab.record(since, "address refusal", |r| {
        r["listener"] == "transparent_tls"
    });
    assert_record(&rec, "block", Some("lab-im"), Some("ip"), "transparent_tls");
    lab.settle();
    assert_untouched(&lab.origin_since(events), 443, "TLS to an IM address");
    let m = lab.metrics();
    assert_eq!(
        metric_value(
            &m,
            "chatwall_blocked_total{app=\"whatsapp\",reason=\"sni\"}"
        ),
        1.0,
        "{m}"
    );
}

/// A parent proxy on the router (a real Squid): redirected streams reach it
/// as `CONNECT <original destination>`, decided first exactly as without
/// it; refused flows never reach it; a dead parent is a 502 naming it.
#[test]
fn redirected_streams_go_through_a_parent_proxy() {
    const PARENT: &str = "127.0.0.1:3140";
    let squid_bin = "/usr/sbin/squid";
    if !Path::new(squid_bin).exists() {
        skip_or_fail("transparent::parent: squid is not installed (apt-get install squid)");
        return;
    }
    let Some(mut lab) = Lab::new("parent", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    // Squid works as its own user (`proxy`) when started as root.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(lab.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let sq = lab.path("squid");
    fs::create_dir_all(&sq).expect("squid dir");
    fs::set_permissions(&sq, fs::Permissions::from_mode(0o777)).expect("chmod squid dir");
    let d = sq.display();
    fs::write(
        sq.join("squid.conf"),
        format!(
            "http_port {PARENT}\npid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\ncache_store_log none\ncoredump_dir {d}\ncache deny all\n\
             cache_mem 8 MB\npinger_enable off\nshutdown_lifetime 0 seconds\nlogfile_rotate 0\n\
             http_access allow localhost\nhttp_access deny all\n"
        ),
    )
    .expect("squid.conf");
    /// Stopped however the test ends.
    struct Stopped(Child);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let squid = Command::new("ip")
        .args(["netns", "exec", &lab.router, squid_bin, "-N", "-f"])
        .arg(sq.join("squid.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Stopped)
        .expect("start squid");
    let squid_log = || fs::read_to_string(sq.join("access.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(sq.join("cache.log"))
        .unwrap_or_default()
        .contains("Accepting HTTP Socket connections")
    {
        assert!(Instant::now() < deadline, "squid did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.start_chatwall(ChatwallOpts {
        parent: Some(PARENT),
        ..ChatwallOpts::default()
    });

    case_http_passes(&lab, &V4, false);
    case_tls_passes(&lab, &V4, false);
    case_http_im_host(&lab, &V4);
    case_tls_im_sni(&lab, &V4);
    lab.settle();
    let log = squid_log();
    for needle in [
        format!("CONNECT {ORIGIN4}:80"),
        format!("CONNECT {ORIGIN4}:443"),
    ] {
        assert!(log.contains(&needle), "the parent has no {needle}:\n{log}");
    }
    assert!(!log.contains("whatsapp"), "{log}");
    // Two tunnels, no more: the refused flows never reached the parent.
    assert_eq!(log.lines().count(), 2, "{log}");

    // A dead parent: the HTTP client gets a 502 naming it.
    drop(squid);
    let since = lab.records().len();
    let r = lab.get(
        &lab.client,
        "http",
        "www.example.test",
        ORIGIN4,
        "/hello?dead",
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.text()
            .contains(&format!("parent proxy {PARENT} refused the connection")),
        "{}",
        r.text()
    );
    let rec = lab.record(since, "dead parent", |r| {
        r["listener"] == "transparent_http"
    });
    assert!(s(&rec, "error").contains("parent proxy"), "{rec}");
}

#[test]
fn im_ports_are_refused_by_port_rules_and_payload_signatures() {
    let Some(mut lab) = Lab::new("imports", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_im_ports(&lab, &V4);
    case_payloads(&lab, &V4);
    let m = lab.metrics();
    assert_eq!(
        metric_value(&m, "chatwall_blocked_total{app=\"xmpp\",reason=\"port\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "chatwall_blocked_total{app=\"yahoo-messenger\",reason=\"payload\"}"
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn connections_to_chatwall_own_listeners_are_refused() {
    let Some(mut lab) = Lab::new("selfconn", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_self_connect(&lab, &V4);
    case_self_connect(&lab, &V6);
}

/// Gateway with local clients (OUTPUT chain), chatwall exempted by its
/// socket mark. Without the mark its upstream connection is redirected back
/// to itself, which the negative control shows.
#[test]
fn gateway_local_clients_with_the_mark_exemption() {
    let Some(mut lab) = Lab::new("gw-mark", Fw::Iptables) else {
        return;
    };
    let mut args = base_args();
    args.push("--local");
    lab.apply(Fw::Iptables, &args);
    lab.start_chatwall(ChatwallOpts {
        extra_clients: &[ROUTER_WAN4, ROUTER_WAN6],
        ..ChatwallOpts::default()
    });
    case_http_passes(&lab, &V4, false);
    case_local_client(&lab, &V4);
    case_local_client(&lab, &V6);

    // Negative control: chatwall without its mark, local clients not
    // allowed. Its upstream connection is redirected back to its own
    // listener, refused there, and the client gets a 502; the origin sees
    // nothing. So it is the mark that kept the upstream out of REDIRECT.
    lab.start_chatwall(ChatwallOpts {
        mark: 0,
        ..ChatwallOpts::default()
    });
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(
        &lab.client,
        "http",
        "www.example.test",
        ORIGIN4,
        "/hello?unmarked",
    );
    assert_eq!(r.status, 502, "{r:?}");
    let rec = lab.record(since, "unmarked upstream", |r| r["method"] == "GET");
    assert_eq!(n(&rec, "status"), 502, "{rec}");
    lab.settle();
    assert!(
        lab.origin_since(events)
            .iter()
            .all(|e| e["ev"] != "request"),
        "{:#?}",
        lab.origin_since(events)
    );

    // Without the mark, local clients allowed: the redirected upstream
    // connection would be accepted as a new client and relayed on, again
    // and again (a tunnel carries no Via). chatwall knows its own upstream
    // sockets and refuses the loop at the first turn: one 502, one loop
    // record, nothing at the origin.
    lab.start_chatwall(ChatwallOpts {
        mark: 0,
        extra_clients: &[ROUTER_WAN4, ROUTER_WAN6],
        ..ChatwallOpts::default()
    });
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(
        &lab.client,
        "http",
        "www.example.test",
        ORIGIN4,
        "/hello?looped",
    );
    assert_eq!(r.status, 502, "{r:?}");
    lab.settle();
    let records: Vec<Value> = lab.records().into_iter().skip(since).collect();
    let loops = records
        .iter()
        .filter(|r| s(r, "error").contains("loop"))
        .count();
    assert_eq!(loops, 1, "one loop refused: {records:#?}");
    assert!(records.len() <= 3, "the loop went no further: {records:#?}");
    assert!(
        lab.origin_since(events)
            .iter()
            .all(|e| e["ev"] != "request"),
        "{:#?}",
        lab.origin_since(events)
    );
}

/// Gateway with local clients, chatwall running as its own user and
/// exempted by the owner match (no mark).
#[test]
fn gateway_local_clients_with_the_owner_exemption() {
    let Some(mut lab) = Lab::new("gw-owner", Fw::Iptables) else {
        return;
    };
    lab.apply(
        Fw::Iptables,
        &["--im-ports", IM_PORTS, "--owner", CHATWALL_UID, "--local"],
    );
    lab.start_chatwall(ChatwallOpts {
        mark: 0,
        extra_clients: &[ROUTER_WAN4, ROUTER_WAN6],
        uid: Some(CHATWALL_UID),
        parent: None,
    });
    case_local_client(&lab, &V4);
    case_local_client(&lab, &V6);
    case_http_passes(&lab, &V4, false);
    case_tls_im_sni(&lab, &V4);
}

#[test]
fn ipv6_key_cases_with_ip6tables() {
    let Some(mut lab) = Lab::new("ipv6", Fw::Iptables) else {
        return;
    };
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_http_passes(&lab, &V6, true);
    case_http_im_host(&lab, &V6);
    case_tls_passes(&lab, &V6, false);
    case_tls_im_sni(&lab, &V6);
    case_im_ports(&lab, &V6);
    case_payloads(&lab, &V6);
    case_quic_dropped(&lab, &V6);

    // TLS to an IM address over IPv6 too.
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(&lab.client, "https", "www.example.test", IM_ORIGIN6, "/");
    assert_ne!(r.exit, Some(0), "{r:?}");
    let rec = lab.record(since, "address refusal", |r| {
        r["listener"] == "transparent_tls"
    });
    assert_record(&rec, "block", Some("lab-im"), Some("ip"), "transparent_tls");
    lab.settle();
    assert_untouched(&lab.origin_since(events), 443, "TLS to an IM address");
}

#[test]
fn nftables_key_cases() {
    let Some(mut lab) = Lab::new("nft", Fw::Nftables) else {
        return;
    };
    let mut args = base_args();
    args.push("--local");
    lab.apply(Fw::Nftables, &args);
    let first = lab.must(
        Some(&lab.router),
        &["nft", "list", "table", "inet", "chatwall"],
    );
    lab.apply(Fw::Nftables, &args);
    let second = lab.must(
        Some(&lab.router),
        &["nft", "list", "table", "inet", "chatwall"],
    );
    assert_eq!(first, second, "apply is idempotent");
    for want in [
        "redirect to :3129",
        "redirect to :3130",
        "redirect to :3131",
        "meta mark 0x0000002a return",
    ] {
        assert!(first.contains(want), "{want:?} in {first}");
    }
    lab.start_chatwall(ChatwallOpts {
        extra_clients: &[ROUTER_WAN4, ROUTER_WAN6],
        ..ChatwallOpts::default()
    });
    for f in [&V4, &V6] {
        case_http_passes(&lab, f, false);
        case_http_im_host(&lab, f);
        case_tls_passes(&lab, f, false);
        case_tls_im_sni(&lab, f);
        case_quic_dropped(&lab, f);
        case_local_client(&lab, f);
    }
    case_http_passes(&lab, &V4, true);
    case_im_ports(&lab, &V4);
    case_payloads(&lab, &V6);
    case_self_connect(&lab, &V4);

    // remove: the table is gone and traffic goes straight to the origin.
    let d = lab.recipe(Fw::Nftables, &["remove"]);
    assert_eq!(d.code, Some(0), "{d:?}");
    let tables = lab.must(Some(&lab.router), &["nft", "list", "tables"]);
    assert!(!tables.contains("chatwall"), "{tables}");
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let r = lab.get(
        &lab.client,
        "http",
        "www.example.test",
        ORIGIN4,
        "/hello?direct",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen: Vec<Value> = lab
        .origin_since(events)
        .into_iter()
        .filter(|e| e["ev"] == "request")
        .collect();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        s(&seen[0], "peer").starts_with(CLIENT4),
        "not redirected any more: {}",
        seen[0]
    );
    lab.settle();
    assert_eq!(
        lab.records().len(),
        since,
        "chatwall saw nothing after remove"
    );
}

/// The iptables recipe on its own: rules in place, UDP 80/443 dropped,
/// `apply` idempotent, `remove` restores the tables exactly, `--local`
/// refused without an exemption, `print` shows the commands.
#[test]
fn iptables_recipe_drops_quic_and_applies_idempotently() {
    let Some(lab) = Lab::new("ipt-recipe", Fw::Iptables) else {
        return;
    };
    let save = || {
        // The rules and the user chains: what apply adds and remove takes.
        let strip = |t: String| {
            t.lines()
                .filter(|l| {
                    l.starts_with("-A") || (l.starts_with(':') && l.split(' ').nth(1) == Some("-"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        (
            strip(lab.must(Some(&lab.router), &["iptables-save"])),
            strip(lab.must(Some(&lab.router), &["ip6tables-save"])),
        )
    };
    let before = save();
    let mut args = base_args();
    args.extend_from_slice(&["--in-iface", "rc"]);
    lab.apply(Fw::Iptables, &args);
    let applied = save();
    for table in [&applied.0, &applied.1] {
        for want in [
            "-A PREROUTING -i rc -p tcp -j CHATWALL_PRE",
            "-A CHATWALL_PRE -m addrtype --dst-type LOCAL -j RETURN",
            "-A CHATWALL_PRE -m mark --mark 0x2a -j RETURN",
            "-A CHATWALL_PRE -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3129",
            "-A CHATWALL_PRE -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 3130",
            "-A CHATWALL_PRE -p tcp -m multiport --dports 5222,5050,4000 -j REDIRECT --to-ports 3131",
            "-A FORWARD -i rc -p udp -j CHATWALL_QUIC",
            "-A CHATWALL_QUIC -p udp -m multiport --dports 80,443 -j DROP",
        ] {
            assert!(table.contains(want), "{want:?} in\n{table}");
        }
        assert!(
            !table.contains("CHATWALL_OUT"),
            "no OUTPUT rules without --local:\n{table}"
        );
    }
    lab.apply(Fw::Iptables, &args);
    assert_eq!(save(), applied, "apply is idempotent");
    case_quic_dropped(&lab, &V4);
    case_quic_dropped(&lab, &V6);

    let d = lab.recipe(Fw::Iptables, &["--local", "apply"]);
    assert_eq!(
        d.code,
        Some(2),
        "--local without --mark/--owner is refused: {d:?}"
    );
    assert!(d.stderr.contains("--mark or --owner"), "{}", d.stderr);

    let d = lab.recipe(
        Fw::Iptables,
        &["--mark", "42", "--local", "--owner", "chatwall", "print"],
    );
    assert_eq!(d.code, Some(0), "{d:?}");
    for want in [
        "iptables -t nat -A CHATWALL_OUT -m owner --uid-owner chatwall -j RETURN",
        "ip6tables -t nat -I OUTPUT 1 -p tcp -j CHATWALL_OUT",
        "iptables -t filter -I OUTPUT 1 -p udp -j CHATWALL_QUIC",
    ] {
        assert!(d.stdout.contains(want), "{want:?} in\n{}", d.stdout);
    }

    let d = lab.recipe(Fw::Iptables, &["remove"]);
    assert_eq!(d.code, Some(0), "{d:?}");
    assert_eq!(save(), before, "remove restores the tables");
    // And UDP 443 flows again.
    let events = lab.origin_events().len();
    lab.udp(ORIGIN4, 443, b"after remove");
    let deadline = Instant::now() + WAIT;
    while !lab
        .origin_since(events)
        .iter()
        .any(|e| e["ev"] == "udp" && e["port"] == 443)
    {
        assert!(
            Instant::now() < deadline,
            "UDP 443 still dropped after remove"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- raw byte exactness ---------------------------------------------------

impl Lab {
    /// Restart the origin with ports 80 and `LAB_PORT` answered by the
    /// scripted raw HTTP responder and 443 by the echo recorder: every
    /// byte each connection receives (`data`) and sends (`sent`, or the
    /// echo of `data`) is logged.
    fn restart_origin_raw(&mut self) {
        if let Some(mut c) = self.origin_proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let ready = self.path("origin.ready");
        let _ = fs::remove_file(&ready);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.origin, "python3"])
            .arg(self.path("origin.py"))
            .arg("--log")
            .arg(self.path("origin.jsonl"))
            .arg("--dir")
            .arg(self.path("files"))
            .arg("--cert")
            .arg(self.path("cert.pem"))
            .arg("--key")
            .arg(self.path("key.pem"))
            .arg("--ready")
            .arg(&ready)
            .args(["--tcp", "5222,5050", "--udp", "80,443,9999"])
            .args(["--raw-http", &format!("80,{LAB_PORT}"), "--raw-echo", "443"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("origin-raw.out")).expect("origin-raw.out"))
            .stderr(fs::File::create(self.path("origin-raw.err")).expect("origin-raw.err"))
            .spawn()
            .expect("start the raw origin");
        self.origin_proc = Some(child);
        let deadline = Instant::now() + WAIT;
        while !ready.exists() {
            if let Some(s) = self
                .origin_proc
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "raw origin exited ({s}): {}",
                    fs::read_to_string(self.path("origin-raw.err")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "raw origin not ready within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bytes of `ev` events ("data" or "sent") on `port` among `events`,
    /// in order.
    fn origin_bytes(events: &[Value], port: u16, ev: &str) -> Vec<u8> {
        events
            .iter()
            .filter(|e| e["port"] == port && e["ev"] == ev)
            .flat_map(|e| unhex(e["hex"].as_str().unwrap_or_default()))
            .collect()
    }
}

/// Show bytes in a failure message.
fn esc(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// One upstream connection on `port`, from chatwall on the router, to the
/// original destination.
fn assert_one_connection(events: &[Value], f: &Family, port: u16, what: &str) {
    let accepts: Vec<&Value> = events
        .iter()
        .filter(|e| e["port"] == port && e["ev"] == "accept")
        .collect();
    assert_eq!(
        accepts.len(),
        1,
        "{what}: one upstream connection: {accepts:#?}"
    );
    assert!(
        s(accepts[0], "peer").starts_with(&bracket(f.router_wan)),
        "{what}: from chatwall on the router: {}",
        accepts[0]
    );
    assert_eq!(
        s(accepts[0], "local"),
        format!("{}:{port}", bracket(f.origin)),
        "{what}: to the original destination"
    );
}

/// Keep-alive and a pipelined second request in one write, mixed-case
/// names and hop-by-hop fields: the origin receives exactly the client's
/// bytes and the client exactly the origin's (no Via, no Date), over one
/// upstream connection.
fn case_raw_http_exact(lab: &Lab, f: &Family, port: u16) {
    let events = lab.origin_events().len();
    let tag = lab.next();
    let sent = format!(
        "GET /raw/first?{tag} HTTP/1.1\r\nhOsT: www.example.test\r\nUser-Agent: Mixed/1.0\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Mixed-CASE: Yes\r\nProxy-Connection: keep-alive\r\n\r\n\
GET /raw/second?{tag} HTTP/1.1\r\nHost: www.example.test\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    );
    let raw = lab.tcp(f.origin, port, &[sent.as_bytes()], 5.0, None);
    let what = format!("HTTP to {}:{port}", bracket(f.origin));
    assert_eq!(raw.connect, "ok", "{what}: {raw:?}");
    lab.settle();
    let ev = lab.origin_since(events);
    let received = Lab::origin_bytes(&ev, port, "data");
    assert_eq!(
        esc(&received),
        esc(sent.as_bytes()),
        "{what}: the origin received exactly the client's bytes"
    );
    let answered = Lab::origin_bytes(&ev, port, "sent");
    assert!(!answered.is_empty(), "{what}: the origin answered: {ev:#?}");
    assert_eq!(
        esc(&raw.received),
        esc(&answered),
        "{what}: the client received exactly the origin's bytes"
    );
    assert_eq!(
        raw.end, "eof",
        "{what}: the origin's close reached the client"
    );
    assert_one_connection(&ev, f, port, &what);
}

/// A real ClientHello and then TLS application-data records on 443: the
/// echo origin receives exactly the client's bytes and the client gets
/// them back exactly, over one upstream connection.
fn case_raw_tls_exact(lab: &Lab, f: &Family) {
    let (since, events) = (lab.records().len(), lab.origin_events().len());
    let hello = crate::support::rustls_client_hello("www.example.test");
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut records = Vec::new();
    for chunk in payload.chunks(16_000) {
        records.extend_from_slice(&[0x17, 0x03, 0x03]);
        records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        records.extend_from_slice(chunk);
    }
    let mut sent = hello.clone();
    sent.extend_from_slice(&records);
    let raw = lab.tcp(f.origin, 443, &[&hello, &records], 5.0, Some(sent.len()));
    let what = format!("TLS records to {}:443", bracket(f.origin));
    assert_eq!(raw.end, "complete", "{what}: {} {}", raw.connect, raw.end);
    assert!(
        raw.received == sent,
        "{what}: the client got its bytes back exactly ({} of {} bytes)",
        raw.received.len(),
        sent.len()
    );
    lab.settle();
    let ev = lab.origin_since(events);
    let received = Lab::origin_bytes(&ev, 443, "data");
    assert!(
        received == sent,
        "{what}: the origin received exactly the client's bytes ({} of {} bytes)",
        received.len(),
        sent.len()
    );
    assert_one_connection(&ev, f, 443, &what);
    let rec = lab.record(since, "the TLS tunnel", |r| {
        r["listener"] == "transparent_tls" && s(r, "sni") == "www.example.test"
    });
    assert_eq!(s(&rec, "verdict"), "allow", "{rec}");
}

#[test]
fn raw_http_on_80_passes_byte_exact_over_one_connection() {
    let Some(mut lab) = Lab::new("raw-80", Fw::Iptables) else {
        return;
    };
    lab.restart_origin_raw();
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_raw_http_exact(&lab, &V4, 80);
    case_raw_http_exact(&lab, &V6, 80);
}

#[test]
fn raw_tls_on_443_passes_byte_exact_over_one_connection() {
    let Some(mut lab) = Lab::new("raw-443", Fw::Iptables) else {
        return;
    };
    lab.restart_origin_raw();
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_raw_tls_exact(&lab, &V4);
    case_raw_tls_exact(&lab, &V6);
}

/// HTTP on a redirected port that is neither 80 nor 443 (the generic
/// transparent listener).
#[test]
fn raw_http_on_another_redirected_port_passes_byte_exact() {
    let Some(mut lab) = Lab::new("raw-other", Fw::Iptables) else {
        return;
    };
    lab.restart_origin_raw();
    lab.apply(Fw::Iptables, &base_args());
    lab.start_chatwall(ChatwallOpts::default());
    case_raw_http_exact(&lab, &V4, LAB_PORT);
    case_raw_http_exact(&lab, &V6, LAB_PORT);
}
