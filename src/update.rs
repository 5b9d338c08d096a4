//! `chatwall signatures update`: fetch a signed bundle (an http:// or
//! https:// URL, or a local path; its signature at the same place plus
//! `.sig`), verify it with `[signatures] update_public_key`, unpack it
//! (under `signatures::bundle`'s limits) next to `[signatures] dir`,
//! validate it exactly as `check-config` would with the current
//! configuration, refuse a `VERSION` that is not newer than the active one,
//! swap it in, record the outcome, and ask a running chatwall to reload
//! (`POST /-/reload` on `[listen] admin`).
//!
//! Files next to `DIR` (`[signatures] dir`):
//! - `DIR.previous/`: the set the last install replaced (one generation);
//! - `DIR.update.json`: the outcome of the last runs (version, time of the
//!   last success, failures counted, last error), which the proxy's
//!   `/metrics` reads ([`UpdateStatus`]);
//! - `DIR.lock`: held (flock) while an update runs;
//! - `DIR.incoming-*`: a bundle being checked; removed on every outcome.
//!
//! The swap is one `renameat2(RENAME_EXCHANGE)` on Linux, so `DIR` always
//! holds a whole set; where the kernel or file system cannot exchange, two
//! renames leave `DIR` missing for an instant (a reload then is refused and
//! the running set stays).
//!
//! Exit codes: 0 installed and reloaded (or `[listen] admin` is off, or the
//! bundle is the active set already, or a dry run); 1 refused (no dir, no
//! key, unsigned, bad signature, not newer, invalid set, unreadable
//! bundle): nothing changed; 3 a runtime failure: the bundle could not be
//! fetched or installed, or it was installed but no chatwall took it
//! (nothing answered on the admin address, or the reload was refused).
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cli::{EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME};
use crate::config::Config;
use crate::engine::Engine;
use crate::signatures::bundle::{self, BundleFile, Version};
use crate::signatures::SignatureSet;

/// Bound on connecting to a bundle server or the admin listener.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one whole fetch (all redirects and the body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the reload request (a reload compiles the whole set).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;
/// Longest last error kept in the status file.
const MAX_ERROR_LEN: usize = 1000;
/// Largest status file read.
pub const MAX_STATUS_BYTES: u64 = 64 * 1024;

/// What `signatures update` leaves in `DIR.update.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// The version installed or found current by the last success.
    #[serde(default)]
    pub version: String,
    /// Unix time of the last successful run (a newer set installed, or the
    /// bundle found to be the active set already); 0 if none.
    #[serde(default)]
    pub last_success: u64,
    /// Unix time of the last failed run; 0 if none.
    #[serde(default)]
    pub last_failure: u64,
    /// Failed runs since the file was created.
    #[serde(default)]
    pub failures: u64,
    /// What the last failed run said.
    #[serde(default)]
    pub last_error: String,
}

/// `DIR.update.json`, `DIR.previous`, `DIR.lock` and `DIR.<suffix>`.
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "signatures".into());
    name.push(suffix);
    dir.with_file_name(name)
}

/// The status file of a signature directory.
pub fn status_path(dir: &Path) -> PathBuf {
    sibling(dir, ".update.json")
}

/// Read a status file; `None` when it does not exist or does not parse.
pub fn read_status(path: &Path) -> Option<UpdateStatus> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_STATUS_BYTES).read_to_end(&mut text))
        .ok()?;
    serde_json::from_slice(&text).ok()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Write a file whole: a temporary beside it, then a rename.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = sibling(path, &format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn record(dir: &Path, change: impl FnOnce(&mut UpdateStatus)) {
    let path = status_path(dir);
    let mut status = read_status(&path).unwrap_or_default();
    change(&mut status);
    let written = serde_json::to_vec_pretty(&status)
        .map_err(std::io::Error::other)
        .and_then(|text| write_atomically(&path, &text));
    if let Err(e) = written {
        eprintln!("chatwall: cannot write {}: {e}", path.display());
    }
}

/// A run that did not end well: the exit code, what to say, and whether it
/// counts as a failed update (a set installed that no chatwall reloaded is
/// not one: the update itself succeeded).
struct Failure {
    code: u8,
    message: String,
    counted: bool,
}

fn refuse(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        message: message.into(),
        counted: true,
    }
}

fn runtime(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_RUNTIME,
        message: message.into(),
        counted: true,
    }
}

fn not_reloaded(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_RUNTIME,
        message: message.into(),
        counted: false,
    }
}

/// `chatwall signatures update [-c FILE] --from SOURCE [--dry-run]`.
pub fn run(config: Option<&Path>, from: &str, dry_run: bool) -> u8 {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let Some(dir) = cfg.signatures_dir.clone() else {
        eprintln!(
            "chatwall: [signatures] dir is empty: the running set is the one compiled into the \
             binary and cannot be updated. Set [signatures] dir to a directory chatwall can read \
             (e.g. /var/lib/chatwall/signatures), then run the update again."
        );
        return EXIT_CONFIG;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatwall: cannot start the runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    let _lock = match lock(&dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chatwall: {e}");
            return EXIT_RUNTIME;
        }
    };
    match rt.block_on(update(&cfg, &dir, from, dry_run)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("chatwall: signatures update from {from}: {}", f.message);
            if f.counted && !dry_run {
                record(&dir, |s| {
                    s.failures += 1;
                    s.last_failure = now();
                    s.last_error = f.message.chars().take(MAX_ERROR_LEN).collect();
                });
            }
            f.code
        }
    }
}

/// Only one update at a time per directory.
#[cfg(target_os = "linux")]
fn lock(dir: &Path) -> Result<std::fs::File, String> {
    let path = sibling(dir, ".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            format!(
                "another signatures update holds {}; try again when it is done",
                path.display()
            )
        },
    )?;
    Ok(file)
}

#[cfg(not(target_os = "linux"))]
fn lock(dir: &Path) -> Result<(), String> {
    let _ = dir;
    Ok(())
}

/// Removes a directory when dropped (the incoming set on every path out).
struct Incoming(PathBuf);

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn update(cfg: &Config, dir: &Path, from: &str, dry_run: bool) -> Result<u8, Failure> {
    let key = cfg.update_public_key.as_deref().ok_or_else(|| {
        refuse("[signatures] update_public_key is empty: name the public key bundles are signed with (chatwall signatures keygen writes one)")
    })?;
    let key = bundle::parse_public_key(key).map_err(refuse)?;

    let (data, signature) = fetch_bundle(from).await?;
    let signature = signature.ok_or_else(|| {
        refuse(format!(
            "unsigned: there is no signature at {from}.sig; nothing changed"
        ))
    })?;
    bundle::verify(&key, &data, &signature).map_err(|e| {
        refuse(format!(
            "{e} (not signed by [signatures] update_public_key); nothing changed"
        ))
    })?;
    let files = bundle::unpack(&data).map_err(|e| refuse(format!("{e}; nothing changed")))?;
    let version = bundle::version_of(&files).map_err(refuse)?;

    let active = active_version(dir);
    if let Some(active) = &active {
        if version < *active {
            return Err(refuse(format!(
                "the bundle's VERSION {version} is older than the active {active} in {}; nothing changed",
                dir.display()
            )));
        }
        if version == *active {
            return if same_files(dir, &files) {
                println!(
                    "{} already holds this set (VERSION {version}); nothing to do",
                    dir.display()
                );
                if !dry_run {
                    record(dir, |s| {
                        s.version = version.to_string();
                        s.last_success = now();
                    });
                }
                Ok(EXIT_OK)
            } else {
                Err(refuse(format!(
                    "the bundle's VERSION {version} is the active one in {} but its files differ: a new set needs a newer VERSION; nothing changed",
                    dir.display()
                )))
            };
        }
    }

    // Unpack next to DIR (same file system, so the swap is a rename).
    let incoming = Incoming(sibling(
        dir,
        &format!(
            ".incoming-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ),
    ));
    write_set(&incoming.0, &files)
        .map_err(|e| runtime(format!("cannot unpack into {}: {e}", incoming.0.display())))?;

    // Validate as check-config does: the new set under the current policy.
    let mut candidate = cfg.clone();
    candidate.signatures_dir = Some(incoming.0.clone());
    let engine = Engine::build(candidate).map_err(|errs| {
        let shown = incoming.0.display().to_string();
        let lines: Vec<String> = errs
            .iter()
            .map(|e| e.replace(&shown, &format!("bundle {version}")))
            .collect();
        refuse(format!(
            "the bundle does not load with this configuration; nothing changed:\n{}",
            lines.join("\n")
        ))
    })?;

    if dry_run {
        let report = dry_run_report(cfg, dir, &engine.signatures, &version);
        print!(
            "{}",
            report.replace(
                &incoming.0.display().to_string(),
                &format!("bundle {version}")
            )
        );
        return Ok(EXIT_OK);
    }

    install(&incoming.0, dir).map_err(|e| {
        runtime(format!(
            "cannot install into {}: {e}; the active set is unchanged",
            dir.display()
        ))
    })?;
    record(dir, |s| {
        s.version = version.to_string();
        s.last_success = now();
    });
    println!(
        "installed signatures {version} into {} ({} apps, {} rules; the previous set is in {})",
        dir.display(),
        engine.signatures.apps().len(),
        engine.signatures.rules().len(),
        sibling(dir, ".previous").display()
    );
    drop(engine);
    reload(cfg).await
}

/// The VERSION of the set in `dir`; `None` when there is no set there yet
/// (no directory, or no VERSION file in it).
fn active_version(dir: &Path) -> Option<Version> {
    let text = std::fs::read_to_string(dir.join("VERSION")).ok()?;
    Version::parse(&text).ok()
}

/// Does `dir` hold exactly these files (by name and bytes, of the names a
/// bundle may carry)?
fn same_files(dir: &Path, files: &[BundleFile]) -> bool {
    bundle::read_set(dir).is_ok_and(|have| have == files)
}

/// Write a set into a new directory (0755, files 0644), synced.
fn write_set(to: &Path, files: &[BundleFile]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir(to)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    }
    for f in files {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o644);
        }
        let mut out = opts.open(to.join(&f.name))?;
        out.write_all(&f.data)?;
        out.sync_all()?;
    }
    sync_dir(to);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Put `incoming` in place of `dir`; the set it replaces goes to
/// `DIR.previous` (an older previous set is removed).
fn install(incoming: &Path, dir: &Path) -> std::io::Result<()> {
    let previous = sibling(dir, ".previous");
    if !dir.exists() {
        std::fs::rename(incoming, dir)?;
    } else if exchange(incoming, dir).is_ok() {
        // `incoming` now holds the old set.
        remove_any(&previous)?;
        std::fs::rename(incoming, &previous)?;
    } else {
        remove_any(&previous)?;
        std::fs::rename(dir, &previous)?;
        if let Err(e) = std::fs::rename(incoming, dir) {
            // Put the old set back.
            let _ = std::fs::rename(&previous, dir);
            return Err(e);
        }
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Swap two paths in one step (renameat2 RENAME_EXCHANGE).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// What `--dry-run` prints: `signatures diff` of the active set and the
/// bundle's.
fn dry_run_report(cfg: &Config, dir: &Path, new: &SignatureSet, version: &Version) -> String {
    let active = if dir.exists() {
        SignatureSet::from_dir(dir, cfg.inspect_bytes).ok()
    } else {
        None
    };
    let mut out = format!(
        "dry run: bundle {version} is signed, newer than the active set and valid; not installed\n"
    );
    match active {
        Some(old) => out.push_str(&crate::cli::diff_report(&old, new)),
        None => out.push_str(&format!(
            "{} holds no set yet: the bundle's {} apps would be installed\n",
            dir.display(),
            new.apps().len()
        )),
    }
    out
}

/// Ask the running chatwall on `[listen] admin` to reload.
async fn reload(cfg: &Config) -> Result<u8, Failure> {
    let Some(admin) = cfg.listen.admin else {
        println!("[listen] admin is off: reload chatwall (SIGHUP or systemctl reload chatwall) to use the new set");
        return Ok(EXIT_OK);
    };
    // A listener on every address is reached on loopback.
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let uri: http::Uri = format!("http://{addr}/-/reload")
        .parse()
        .map_err(|e| runtime(format!("{e}")))?;
    let asked = tokio::time::timeout(RELOAD_TIMEOUT, async {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        send(stream, http::Method::POST, &uri, 64 * 1024)
            .await
            .map(|(status, _, body)| (status, body))
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    match asked {
        Ok((status, body)) if status == http::StatusCode::OK => {
            print!("chatwall at {addr}: {}", String::from_utf8_lossy(&body));
            Ok(EXIT_OK)
        }
        Ok((status, body)) => Err(not_reloaded(format!(
            "installed, but the chatwall at {addr} refused to reload ({status}): {}the running set is unchanged until a reload succeeds",
            String::from_utf8_lossy(&body)
        ))),
        Err(e) => Err(not_reloaded(format!(
            "installed, but no chatwall answered at {addr} ({e}): the new set is used once chatwall starts or reloads (systemctl reload chatwall, SIGHUP, POST /-/reload)"
        ))),
    }
}

/// The bundle and its signature (`None` when there is none).
async fn fetch_bundle(from: &str) -> Result<(Vec<u8>, Option<String>), Failure> {
    let sig_source = format!("{from}.sig");
    if from.starts_with("http://") || from.starts_with("https://") {
        let data = fetch_url(from, bundle::MAX_BUNDLE_BYTES)
            .await
            .map_err(|e| runtime(format!("cannot fetch the bundle: {e}")))?
            .ok_or_else(|| runtime(format!("cannot fetch the bundle: {from}: not found")))?;
        let sig = fetch_url(&sig_source, bundle::MAX_SIGNATURE_BYTES)
            .await
            .map_err(|e| runtime(format!("cannot fetch the signature: {e}")))?;
        let sig = sig
            .map(|s| String::from_utf8(s).map_err(|_| refuse("the signature is not text")))
            .transpose()?;
        return Ok((data, sig));
    }
    let data = read_bounded(Path::new(from), bundle::MAX_BUNDLE_BYTES)
        .map_err(|e| refuse(format!("{from}: {e}")))?;
    let sig = match read_bounded(Path::new(&sig_source), bundle::MAX_SIGNATURE_BYTES) {
        Ok(s) => Some(String::from_utf8(s).map_err(|_| refuse("the signature is not text"))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(refuse(format!("{sig_source}: {e}"))),
    };
    Ok((data, sig))
}

fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(out)
}

/// GET a URL, following up to [`MAX_REDIRECTS`] redirects (never from
/// https to http); `Ok(None)` on 404 or 410.
async fn fetch_url(url: &str, limit: usize) -> Result<Option<Vec<u8>>, String> {
    tokio::time::timeout(FETCH_TIMEOUT, async {
        let mut uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        for _ in 0..=MAX_REDIRECTS {
            let (status, body, location) = get_once(&uri, limit).await?;
            match status.as_u16() {
                200 => return Ok(Some(body)),
                404 | 410 => return Ok(None),
                301 | 302 | 303 | 307 | 308 => {
                    let next =
                        location.ok_or_else(|| format!("{uri}: {status} without Location"))?;
                    let next = resolve(&uri, &next)?;
                    if uri.scheme_str() == Some("https") && next.scheme_str() != Some("https") {
                        return Err(format!("{uri}: refusing a redirect from https to {next}"));
                    }
                    uri = next;
                }
                _ => return Err(format!("{uri}: HTTP {status}")),
            }
        }
        Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
    })
    .await
    .unwrap_or_else(|_| Err(format!("{url}: timed out")))
}

/// A Location against the URL it came from.
fn resolve(base: &http::Uri, location: &str) -> Result<http::Uri, String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location
            .parse()
            .map_err(|e| format!("bad Location {location}: {e}"));
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| format!("bad Location {location}: {e}"))
}

/// One GET: status, body (at most `limit` bytes, for 200) and Location.
async fn get_once(
    uri: &http::Uri,
    limit: usize,
) -> Result<(http::StatusCode, Vec<u8>, Option<String>), String> {
    let host = uri
        .host()
        .ok_or_else(|| format!("{uri}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri}: only http:// and https:// URLs")),
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("{uri}: connect timed out"))?
    .map_err(|e| format!("{uri}: {e}"))?;
    let (status, head_location, body) = if https {
        let tls = tls_connector()?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{uri}: {e}"))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{uri}: TLS: {e}"))?;
        send(stream, http::Method::GET, uri, limit).await?
    } else {
        send(tcp, http::Method::GET, uri, limit).await?
    };
    Ok((status, body, head_location))
}

/// rustls trusting the operating system's CA store.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("no CA certificate in the system store (install ca-certificates)".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
}

/// One HTTP/1.1 request over `io` (no body): (status, Location, body of
/// at most `limit` bytes unless it is a redirect).
async fn send<S>(
    io: S,
    method: http::Method,
    uri: &http::Uri,
    limit: usize,
) -> Result<(http::StatusCode, Option<String>, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("{uri}: {e}"))?;
    let conn = tokio::spawn(conn);
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(
            http::header::USER_AGENT,
            concat!("chatwall/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{uri}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{uri}: {e}"))?;
    let status = resp.status();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = if status == http::StatusCode::OK || !status.is_redirection() {
        Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("{uri}: the body: {e}"))?
            .to_bytes()
            .to_vec()
    } else {
        Vec::new()
    };
    conn.abort();
    Ok((status, location, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siblings_sit_beside_the_directory() {
        let d = Path::new("/var/lib/chatwall/signatures");
        assert_eq!(
            status_path(d),
            Path::new("/var/lib/chatwall/signatures.update.json")
        );
        assert_eq!(
            sibling(d, ".previous"),
            Path::new("/var/lib/chatwall/signatures.previous")
        );
    }

    #[test]
    fn redirects_resolve_against_their_url() {
        let base: http::Uri = "https://example.net/a/b/set.tar.gz".parse().expect("uri");
        let r = |l: &str| resolve(&base, l).expect(l).to_string();
        assert_eq!(r("/c/d"), "https://example.net/c/d");
        assert_eq!(r("e.tar.gz"), "https://example.net/a/b/e.tar.gz");
        assert_eq!(r("http://other.example/x"), "http://other.example/x");
    }

    #[test]
    fn install_swaps_and_keeps_one_previous_set() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("signatures");
        let set = |v: &str| {
            vec![
                BundleFile {
                    name: "VERSION".into(),
                    data: v.as_bytes().to_vec(),
                },
                BundleFile {
                    name: "a.toml".into(),
                    data: v.as_bytes().to_vec(),
                },
            ]
        };
        for v in ["1", "2", "3"] {
            let incoming = sibling(&dir, ".incoming-test");
            write_set(&incoming, &set(v)).expect("write");
            install(&incoming, &dir).expect("install");
            assert!(!incoming.exists());
            assert_eq!(std::fs::read_to_string(dir.join("VERSION")).expect("v"), v);
        }
        let previous = sibling(&dir, ".previous");
        assert_eq!(
            std::fs::read_to_string(previous.join("VERSION")).expect("v"),
            "2"
        );
    }

    #[test]
    fn status_round_trips_and_tolerates_garbage() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("signatures");
        assert_eq!(read_status(&status_path(&dir)), None);
        record(&dir, |s| {
            s.failures += 1;
            s.last_error = "x".into();
        });
        record(&dir, |s| s.failures += 1);
        let s = read_status(&status_path(&dir)).expect("status");
        assert_eq!(s.failures, 2);
        assert_eq!(s.last_error, "x");
        std::fs::write(status_path(&dir), b"{not json").expect("write");
        assert_eq!(read_status(&status_path(&dir)), None);
    }
}
