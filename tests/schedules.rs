//! Scheduled policy exceptions: `classify host --client --user --at`
//! through the binary (inside and outside a window, across midnight and a
//! daylight-saving change), `check-config` errors with file:line, and a
//! running proxy that names the deciding exception in its access log and
//! metrics.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{read_response, HttpOrigin, Proxy, WAIT};

/// The binary, bounded, without the caller's `CHATWALL*` environment:
/// (exit code, stdout, stderr).
fn chatwall(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatwall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATWALL") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatwall");
    let deadline = Instant::now() + WAIT * 3;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatwall {args:?} did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatwall.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

const LUNCH: &str = r#"[policy]
default = "block"

[[policy.exceptions]]
name = "lunch"
clients = ["10.1.0.0/16"]
apps = ["slack"]
action = "allow"
schedule = ["Mon-Fri 12:00-13:00", "Sat-Sun"]
timezone = "Europe/Berlin"

[[policy.exceptions]]
name = "late-thursday"
clients = ["10.1.0.0/16"]
apps = ["slack"]
action = "allow"
schedule = ["Thu 22:00-02:00"]
timezone = "Europe/Berlin"

[[policy.exceptions]]
name = "sunday-morning"
users = ["alice"]
apps = ["slack"]
action = "monitor"
schedule = ["Sun 08:00-09:00"]
timezone = "Europe/Berlin"
"#;

/// `classify host app.slack.com` for a client, user and moment: the first
/// line of the output.
fn classify(path: &std::path::Path, client: &str, user: Option<&str>, at: &str) -> String {
    let p = path.display().to_string();
    let mut args = vec![
        "classify",
        "host",
        "app.slack.com",
        "-c",
        &p,
        "--client",
        client,
        "--at",
        at,
    ];
    if let Some(u) = user {
        args.extend(["--user", u]);
    }
    let (code, out, err) = chatwall(&args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn classify_shows_the_decision_at_a_moment_and_the_exception_that_made_it() {
    let (_d, path) = config(LUNCH);
    let c = "10.1.2.3";
    // Monday 2 June 2025, Berlin summer time.
    assert_eq!(
        classify(&path, c, None, "2025-06-02T12:30:00+02:00"),
        "allow app.slack.com:443 exception=lunch"
    );
    assert_eq!(
        classify(&path, c, None, "2025-06-02T13:30:00+02:00"),
        "block app.slack.com:443"
    );
    // The same moment written in UTC.
    assert_eq!(
        classify(&path, c, None, "2025-06-02T10:59:59Z"),
        "allow app.slack.com:443 exception=lunch"
    );
    assert_eq!(
        classify(&path, c, None, "2025-06-02T11:00:00Z"),
        "block app.slack.com:443"
    );
    // Another client is not excepted, whatever the time.
    assert_eq!(
        classify(&path, "10.2.0.1", None, "2025-06-02T12:30:00+02:00"),
        "block app.slack.com:443"
    );
    // The weekend, all day.
    assert_eq!(
        classify(&path, c, None, "2025-06-07T03:00:00+02:00"),
        "allow app.slack.com:443 exception=lunch"
    );
}

#[test]
fn classify_follows_a_window_across_midnight() {
    let (_d, path) = config(LUNCH);
    let c = "10.1.2.3";
    let late = "allow app.slack.com:443 exception=late-thursday";
    let no = "block app.slack.com:443";
    // Thursday 5 June 2025, 22:00 to Friday 02:00, Berlin time.
    assert_eq!(classify(&path, c, None, "2025-06-05T21:59:00+02:00"), no);
    assert_eq!(classify(&path, c, None, "2025-06-05T22:00:00+02:00"), late);
    assert_eq!(classify(&path, c, None, "2025-06-05T23:59:59+02:00"), late);
    // After midnight, Friday's first hours still belong to Thursday.
    assert_eq!(classify(&path, c, None, "2025-06-06T00:00:00+02:00"), late);
    assert_eq!(classify(&path, c, None, "2025-06-06T01:59:59+02:00"), late);
    assert_eq!(classify(&path, c, None, "2025-06-06T02:00:00+02:00"), no);
    // Thursday's own small hours follow Wednesday: no window.
    assert_eq!(classify(&path, c, None, "2025-06-05T01:00:00+02:00"), no);
    // Friday night is not Thursday night.
    assert_eq!(classify(&path, c, None, "2025-06-06T23:00:00+02:00"), no);
    // In winter (UTC+1): Friday 9 January 2026 at 01:30 local is 00:30 UTC.
    assert_eq!(classify(&path, c, None, "2026-01-09T00:30:00Z"), late);
    assert_eq!(classify(&path, c, None, "2026-01-09T01:30:00Z"), no);
}

#[test]
fn classify_follows_wall_clock_time_across_a_daylight_saving_change() {
    let (_d, path) = config(LUNCH);
    // Sunday 30 March 2025: Berlin moves from UTC+1 to UTC+2 at 02:00.
    // 08:30 local is 06:30 UTC that day (07:30 UTC a week earlier).
    let alice = Some("alice");
    let c = "192.0.2.10";
    assert_eq!(
        classify(&path, c, alice, "2025-03-23T07:30:00Z"),
        "monitor app.slack.com:443 exception=sunday-morning"
    );
    assert_eq!(
        classify(&path, c, alice, "2025-03-23T06:30:00Z"),
        "block app.slack.com:443"
    );
    assert_eq!(
        classify(&path, c, alice, "2025-03-30T06:30:00Z"),
        "monitor app.slack.com:443 exception=sunday-morning"
    );
    assert_eq!(
        classify(&path, c, alice, "2025-03-30T07:30:00Z"),
        "block app.slack.com:443"
    );
    // And back on 26 October.
    assert_eq!(
        classify(&path, c, alice, "2025-10-26T07:30:00Z"),
        "monitor app.slack.com:443 exception=sunday-morning"
    );
    // The user must match.
    assert_eq!(
        classify(&path, c, Some("bob"), "2025-03-30T06:30:00Z"),
        "block app.slack.com:443"
    );
    assert_eq!(
        classify(&path, c, None, "2025-03-30T06:30:00Z"),
        "block app.slack.com:443"
    );
}

#[test]
fn classify_refuses_a_moment_that_is_not_rfc3339() {
    let (_d, path) = config(LUNCH);
    let p = path.display().to_string();
    for bad in [
        "tomorrow",
        "2025-06-02 12:30",
        "2025-06-02T12:30:00",
        "1717322400",
    ] {
        let (code, _, err) =
            chatwall(&["classify", "host", "app.slack.com", "-c", &p, "--at", bad]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains("RFC 3339"), "{bad}: {err}");
    }
}

#[test]
fn check_config_names_file_and_line_of_a_bad_schedule_or_time_zone() {
    let head = "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\n";
    for (tail, line, field) in [
        (
            "schedule = [\n  \"Mon-Fri 12:00-13:00\",\n  \"Mon-Fri 13:00-12:60\",\n]\ntimezone = \"Europe/Berlin\"\n",
            6,
            "policy.exceptions.schedule",
        ),
        (
            "schedule = [\"Mon-Fri 12:00-13:00\"]\ntimezone = \"Europe/Berlinn\"\n",
            5,
            "policy.exceptions.timezone",
        ),
    ] {
        let (_d, path) = config(&format!("{head}{tail}"));
        let file = path.display().to_string();
        let (code, _, err) = chatwall(&["check-config", "-c", &file]);
        assert_eq!(code, Some(1), "{err}");
        let want = format!("{file}:{line}: {field}: ");
        assert!(
            err.lines().any(|l| l.starts_with(&want)),
            "no `{want}` in:\n{err}"
        );
    }
    // The shipped documentation of the keys is a valid schedule.
    let (_d, path) = config(LUNCH);
    let (code, out, err) = chatwall(&["check-config", "-c", &path.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().last(), Some("ok"));
}

/// 0 = Monday, from the clock (UTC).
fn weekday_now() -> u64 {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        / 86_400;
    (days + 3) % 7
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// A proxy whose app `loopback` (the name `localhost`) is excepted by
/// `exceptions` (TOML) and otherwise blocked.
async fn proxy_with(exceptions: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let sigs = dir.path().join("sigs");
    std::fs::create_dir_all(&sigs).expect("mkdir");
    std::fs::write(
        sigs.join("loopback.toml"),
        "id = \"loopback\"\nname = \"Loopback\"\ncategory = \"consumer-im\"\n[[hosts]]\nnames = [\"localhost\"]\nsource = \"test fixture\"\n",
    )
    .expect("write sig");
    let p = Proxy::start(&format!(
        "[access]\ndeny_destinations = []\n[signatures]\ndir = {:?}\n{exceptions}",
        sigs.display().to_string()
    ))
    .await;
    // The signature directory outlives the start (it is read once).
    drop(dir);
    p
}

async fn get_localhost(proxy: &Proxy, origin: &HttpOrigin) -> u16 {
    let port = origin.addr.port();
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    read_response(&mut s).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_applies_the_schedule_and_logs_the_exception() {
    let origin = HttpOrigin::start().await;
    let today = weekday_now() as usize;
    // Yesterday to tomorrow holds now, whatever the hour; the day three
    // days on does not, even at a day boundary.
    let around = format!("{}-{}", DAYS[(today + 6) % 7], DAYS[(today + 1) % 7]);
    let elsewhen = DAYS[(today + 3) % 7];

    let proxy = proxy_with(&format!(
        "[[policy.exceptions]]\nname = \"elsewhen\"\napps = [\"loopback\"]\naction = \"allow\"\nschedule = [\"{elsewhen}\"]\ntimezone = \"UTC\"\n\n[[policy.exceptions]]\nname = \"around-now\"\napps = [\"loopback\"]\naction = \"monitor\"\nschedule = [\"{around}\"]\ntimezone = \"UTC\"\n"
    ))
    .await;
    assert_eq!(
        get_localhost(&proxy, &origin).await,
        200,
        "monitored, passes"
    );
    let log = proxy.wait_log(1).await;
    let rec = log.last().expect("a record");
    assert_eq!(rec["verdict"], "monitor", "{rec}");
    assert_eq!(rec["app"], "loopback", "{rec}");
    assert_eq!(rec["exception"], "around-now", "{rec}");
    assert_eq!(
        proxy
            .metric(
                "chatwall_exception_decisions_total{action=\"monitor\",exception=\"around-now\"}"
            )
            .await,
        1.0
    );
    proxy.stop().await;

    // Only the exception that does not hold now: the default blocks, and
    // no exception is named.
    let proxy = proxy_with(&format!(
        "[[policy.exceptions]]\nname = \"elsewhen\"\napps = [\"loopback\"]\naction = \"allow\"\nschedule = [\"{elsewhen}\"]\ntimezone = \"UTC\"\n"
    ))
    .await;
    assert_eq!(get_localhost(&proxy, &origin).await, 403);
    let log = proxy.wait_log(1).await;
    let rec = log.last().expect("a record");
    assert_eq!(rec["verdict"], "block", "{rec}");
    assert!(rec["exception"].is_null(), "{rec}");
    proxy.stop().await;

    // Inside the window the allow exception lets it through.
    let proxy = proxy_with(&format!(
        "[[policy.exceptions]]\nname = \"now\"\napps = [\"loopback\"]\naction = \"allow\"\nschedule = [\"{around}\"]\ntimezone = \"Europe/Berlin\"\n"
    ))
    .await;
    assert_eq!(get_localhost(&proxy, &origin).await, 200);
    proxy.stop().await;
}
