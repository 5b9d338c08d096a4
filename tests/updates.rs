//! Signature updates (issue 14): `chatwall signatures keygen|sign|update`
//! through the built binary, bundles served by a real HTTP server on
//! loopback, and a running chatwall whose admin listener takes the reload.
//! Every refused update (tampered, unsigned, wrong key, older, invalid)
//! exits 1 and leaves the old set serving; a good one lands and is used.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{read_response, Proxy, WAIT};

/// Files served by path; a path not in the map is a 404.
type Served = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// A plain HTTP server on loopback serving `files` (and one redirect:
/// `/moved/NAME` answers 302 to `/NAME`).
async fn file_server(files: Served) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let files = Arc::clone(&files);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let files = Arc::clone(&files);
                    async move {
                        let path = req.uri().path().to_string();
                        let resp = if let Some(rest) = path.strip_prefix("/moved/") {
                            Response::builder()
                                .status(302)
                                .header("Location", format!("/{rest}"))
                                .body(Full::new(Bytes::new()))
                        } else {
                            match files.lock().expect("lock").get(&path) {
                                Some(b) => {
                                    Response::builder().body(Full::new(Bytes::from(b.clone())))
                                }
                                None => Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::from_static(b"not found"))),
                            }
                        };
                        Ok::<_, Infallible>(resp.expect("response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// One bounded run of the binary: (exit code, stdout, stderr).
async fn chatwall(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatwall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATWALL") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .expect("chatwall exits in time")
        .expect("chatwall runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A signature directory: VERSION and one IM app per (id, host).
fn write_set(dir: &Path, version: &str, apps: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("VERSION"), format!("{version}\n")).expect("VERSION");
    for (id, host) in apps {
        std::fs::write(
            dir.join(format!("{id}.toml")),
            format!(
                "id = \"{id}\"\nname = \"{id} (test)\"\ncategory = \"consumer-im\"\n\n[[hosts]]\nnames = [\"{host}\"]\nsource = \"test fixture\"\n"
            ),
        )
        .expect("app");
    }
}

/// `signatures sign` of `set` with `key` into `out` (and `out.sig`).
async fn sign(key: &Path, out: &Path, set: &Path) {
    let (code, stdout, stderr) = chatwall(&[
        "signatures",
        "sign",
        "--key",
        &key.display().to_string(),
        "--out",
        &out.display().to_string(),
        &set.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "sign: {stdout}{stderr}");
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The status of CONNECT `host:443` through the proxy: 403 when a rule
/// refuses the name, 502 when it passes (`.example` names do not resolve).
async fn connect_status(proxy: SocketAddr, host: &str) -> u16 {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .expect("write");
    read_response(&mut s).await.0
}

/// Everything one test needs: keys, a config, the active set, a server.
struct Rig {
    root: tempfile::TempDir,
    config: PathBuf,
    dir: PathBuf,
    key: PathBuf,
    files: Served,
    server: SocketAddr,
    admin: SocketAddr,
}

impl Rig {
    async fn new() -> Rig {
        let root = tempfile::tempdir().expect("tempdir");
        let keys = root.path().join("keys");
        let (code, out, err) =
            chatwall(&["signatures", "keygen", "--dir", &keys.display().to_string()]).await;
        assert_eq!(code, Some(0), "keygen: {out}{err}");
        let key = keys.join("signing.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the secret key is private");
        }
        assert!(keys.join("signing.pub").exists());
        let dir = root.path().join("state").join("signatures");
        write_set(&dir, "2027.01.01", &[("old-im", "old-im.example")]);
        let admin = free_port();
        let config = root.path().join("chatwall.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"{admin}\"\n\n[log]\naccess = \"off\"\nlevel = \"warn\"\n\n\
                 [signatures]\ndir = \"state/signatures\"\nupdate_public_key = \"keys/signing.pub\"\n\n\
                 [access]\ndeny_destinations = []\n"
            ),
        )
        .expect("config");
        let files: Served = Arc::default();
        let server = file_server(Arc::clone(&files)).await;
        Rig {
            root,
            config,
            dir,
            key,
            files,
            server,
            admin,
        }
    }

    /// Sign a set of `version` with `apps` and serve it as `/NAME` (and
    /// `/NAME.sig`); returns (bundle, signature) bytes.
    async fn publish(
        &self,
        name: &str,
        version: &str,
        apps: &[(&str, &str)],
        key: &Path,
    ) -> (Vec<u8>, Vec<u8>) {
        let set = self.root.path().join(format!("src-{name}"));
        write_set(&set, version, apps);
        let out = self.root.path().join(name);
        sign(key, &out, &set).await;
        let bundle = std::fs::read(&out).expect("bundle");
        let sig = std::fs::read(format!("{}.sig", out.display())).expect("sig");
        let mut files = self.files.lock().expect("lock");
        files.insert(format!("/{name}"), bundle.clone());
        files.insert(format!("/{name}.sig"), sig.clone());
        (bundle, sig)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.server)
    }

    async fn update(&self, from: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        let config = self.config.display().to_string();
        let mut args = vec!["signatures", "update", "-c", &config, "--from", from];
        args.extend_from_slice(extra);
        chatwall(&args).await
    }

    fn active_version(&self) -> String {
        std::fs::read_to_string(self.dir.join("VERSION"))
            .expect("VERSION")
            .trim()
            .to_string()
    }

    async fn proxy(&self) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        // Proxy::start_file keeps `dir` alive; the configuration stays in
        // the rig's root, where its relative paths point.
        let _ = std::fs::write(&log, b"");
        Proxy::start_file(dir, self.config.clone(), log).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_updates_change_nothing_and_a_good_one_is_used_by_the_running_proxy() {
    let rig = Rig::new().await;
    let proxy = rig.proxy().await;
    assert_eq!(proxy.admin, rig.admin);
    assert_eq!(connect_status(proxy.addr, "old-im.example").await, 403);
    assert_eq!(connect_status(proxy.addr, "new-im.example").await, 502);
    assert_eq!(
        proxy
            .metric("chatwall_signatures_info{version=\"2027.01.01\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("chatwall_signatures_last_update_timestamp_seconds")
            .await,
        0.0
    );

    let new_apps = [("old-im", "old-im.example"), ("new-im", "new-im.example")];
    let (bundle, sig) = rig
        .publish("v2.tar.gz", "2027.01.02", &new_apps, &rig.key)
        .await;
    let before = std::fs::read_to_string(rig.dir.join("old-im.toml")).expect("old");

    // Tampered: one byte of the bundle changed, the signature kept.
    let mut tampered = bundle.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    {
        let mut f = rig.files.lock().expect("lock");
        f.insert("/tampered.tar.gz".into(), tampered);
        f.insert("/tampered.tar.gz.sig".into(), sig.clone());
        // Unsigned: no .sig beside it.
        f.insert("/unsigned.tar.gz".into(), bundle.clone());
    }
    // Wrong key: a valid signature by another key.
    let other = rig.root.path().join("other");
    let (code, _, _) = chatwall(&[
        "signatures",
        "keygen",
        "--dir",
        &other.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0));
    rig.publish(
        "wrongkey.tar.gz",
        "2027.01.02",
        &new_apps,
        &other.join("signing.key"),
    )
    .await;

    for (name, why) in [
        ("tampered.tar.gz", "bad signature"),
        ("unsigned.tar.gz", "unsigned"),
        ("wrongkey.tar.gz", "bad signature"),
    ] {
        let (code, out, err) = rig.update(&rig.url(name), &[]).await;
        assert_eq!(code, Some(1), "{name}: {out}{err}");
        assert!(err.contains(why), "{name}: {err}");
        assert!(err.contains("nothing changed"), "{name}: {err}");
        assert_eq!(rig.active_version(), "2027.01.01", "{name}");
        assert_eq!(
            std::fs::read_to_string(rig.dir.join("old-im.toml")).expect("old"),
            before
        );
        assert!(!rig.dir.join("new-im.toml").exists(), "{name}");
        assert_eq!(
            connect_status(proxy.addr, "new-im.example").await,
            502,
            "{name}"
        );
    }
    assert_eq!(
        proxy
            .metric("chatwall_signatures_update_failures_total")
            .await,
        3.0
    );

    // A dry run prints the diff and installs nothing.
    let (code, out, err) = rig.update(&rig.url("v2.tar.gz"), &["--dry-run"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("+ app new-im"), "{out}");
    assert!(out.contains("1 apps added, 0 removed"), "{out}");
    assert_eq!(rig.active_version(), "2027.01.01");

    // The good one, through a redirect: installed, reloaded, used.
    let (code, out, err) = rig.update(&rig.url("moved/v2.tar.gz"), &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("installed signatures 2027.01.02"), "{out}");
    assert!(out.contains("reloaded"), "{out}");
    assert_eq!(rig.active_version(), "2027.01.02");
    let previous = rig.dir.with_file_name("signatures.previous");
    assert_eq!(
        std::fs::read_to_string(previous.join("VERSION"))
            .expect("previous")
            .trim(),
        "2027.01.01"
    );
    assert_eq!(connect_status(proxy.addr, "new-im.example").await, 403);
    assert_eq!(connect_status(proxy.addr, "old-im.example").await, 403);
    let metrics = proxy.metrics().await;
    assert_eq!(
        crate::support::metric_value(&metrics, "chatwall_signatures_info{version=\"2027.01.02\"}"),
        1.0
    );
    assert!(
        !metrics.contains("chatwall_signatures_info{version=\"2027.01.01\"}"),
        "only the active version is published"
    );
    let stamp = crate::support::metric_value(
        &metrics,
        "chatwall_signatures_last_update_timestamp_seconds",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as f64;
    assert!(
        stamp > now - 300.0 && stamp <= now + 1.0,
        "{stamp} vs {now}"
    );

    // The same bundle again: already current, nothing to do, not a failure.
    let (code, out, err) = rig.update(&rig.url("v2.tar.gz"), &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("nothing to do"), "{out}");

    // Older (a properly signed 2027.01.01) and the same VERSION with other
    // files: refused, the new set keeps serving.
    rig.publish(
        "old.tar.gz",
        "2027.01.01",
        &[("old-im", "old-im.example")],
        &rig.key,
    )
    .await;
    rig.publish(
        "same.tar.gz",
        "2027.01.02",
        &[("other-im", "other-im.example")],
        &rig.key,
    )
    .await;
    for (name, why) in [("old.tar.gz", "older"), ("same.tar.gz", "newer VERSION")] {
        let (code, out, err) = rig.update(&rig.url(name), &[]).await;
        assert_eq!(code, Some(1), "{name}: {out}{err}");
        assert!(err.contains(why), "{name}: {err}");
        assert_eq!(rig.active_version(), "2027.01.02", "{name}");
    }
    assert_eq!(connect_status(proxy.addr, "new-im.example").await, 403);
    assert_eq!(
        proxy
            .metric("chatwall_signatures_update_failures_total")
            .await,
        5.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_does_not_load_with_the_policy_is_refused() {
    let rig = Rig::new().await;
    // The policy names old-im; a set without it would fail check-config.
    let text = std::fs::read_to_string(&rig.config).expect("config");
    std::fs::write(
        &rig.config,
        format!("{text}\n[policy.apps]\nold-im = \"monitor\"\n"),
    )
    .expect("config");
    rig.publish(
        "v2.tar.gz",
        "2027.02.01",
        &[("new-im", "new-im.example")],
        &rig.key,
    )
    .await;
    let (code, out, err) = rig.update(&rig.url("v2.tar.gz"), &[]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("old-im"), "{err}");
    assert!(err.contains("does not load"), "{err}");
    assert_eq!(rig.active_version(), "2027.01.01");
    // No leftovers beside the directory.
    let parent = rig.dir.parent().expect("parent");
    let left: Vec<String> = std::fs::read_dir(parent)
        .expect("ls")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("incoming"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A bundle with a bad rule is refused the same way.
    let set = rig.root.path().join("broken");
    write_set(&set, "2027.03.01", &[("old-im", "old-im.example")]);
    std::fs::write(
        set.join("bad.toml"),
        "id = \"bad\"\nname = \"Bad\"\ncategory = \"consumer-im\"\n[[hosts]]\nnames = [\"*\"]\nsource = \"x\"\n",
    )
    .expect("bad");
    // `sign` itself refuses a directory that does not load.
    let out = rig.root.path().join("broken.tar.gz");
    let (code, _, err) = chatwall(&[
        "signatures",
        "sign",
        "--key",
        &rig.key.display().to_string(),
        "--out",
        &out.display().to_string(),
        &set.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_bundle_installs_without_a_running_proxy_and_says_so() {
    let rig = Rig::new().await;
    rig.publish(
        "v2.tar.gz",
        "2027.01.02",
        &[("new-im", "new-im.example")],
        &rig.key,
    )
    .await;
    let local = rig.root.path().join("v2.tar.gz").display().to_string();
    // Nothing listens on the admin address: installed, exit 3, told to reload.
    let (code, out, err) = rig.update(&local, &[]).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("installed signatures 2027.01.02"), "{out}");
    assert!(err.contains("no chatwall answered"), "{err}");
    assert_eq!(rig.active_version(), "2027.01.02");
    // Not a failed update: the status file records a success only.
    let status: serde_json::Value = serde_json::from_slice(
        &std::fs::read(rig.dir.with_file_name("signatures.update.json")).expect("status"),
    )
    .expect("json");
    assert_eq!(status["failures"], 0, "{status}");
    assert_eq!(status["version"], "2027.01.02", "{status}");
    // A chatwall started now runs the new set.
    let proxy = rig.proxy().await;
    assert_eq!(connect_status(proxy.addr, "new-im.example").await, 403);
    assert!(
        proxy
            .metric("chatwall_signatures_last_update_timestamp_seconds")
            .await
            > 0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_needs_a_signature_directory_and_a_key() {
    let rig = Rig::new().await;
    rig.publish(
        "v2.tar.gz",
        "2027.01.02",
        &[("new-im", "new-im.example")],
        &rig.key,
    )
    .await;
    let bundled = rig.root.path().join("bundled.toml");
    std::fs::write(
        &bundled,
        "[signatures]\nupdate_public_key = \"keys/signing.pub\"\n",
    )
    .expect("config");
    let (code, _, err) = chatwall(&[
        "signatures",
        "update",
        "-c",
        &bundled.display().to_string(),
        "--from",
        &rig.url("v2.tar.gz"),
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(err.contains("[signatures] dir is empty"), "{err}");

    let keyless = rig.root.path().join("keyless.toml");
    std::fs::write(&keyless, "[signatures]\ndir = \"state/signatures\"\n").expect("config");
    let (code, _, err) = chatwall(&[
        "signatures",
        "update",
        "-c",
        &keyless.display().to_string(),
        "--from",
        &rig.url("v2.tar.gz"),
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(err.contains("update_public_key"), "{err}");
    assert_eq!(rig.active_version(), "2027.01.01");

    // A bundle that is not there at all is a fetch failure (3), not a refusal.
    let (code, _, err) = rig.update(&rig.url("missing.tar.gz"), &[]).await;
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(rig.active_version(), "2027.01.01");
}
