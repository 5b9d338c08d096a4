//! Table tests of the decisions: request following over byte streams fed
//! in every split, and the first-bytes cues.
use super::*;
use crate::config::Config;

fn engine(config: &str) -> Engine {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatwall.toml");
    std::fs::write(&path, config).expect("write config");
    Engine::build(Config::load(Some(&path)).expect("config")).expect("engine")
}

fn who() -> Who {
    Who::ip("10.0.0.2".parse().expect("ip"))
}

const DST: &str = "198.51.100.7:80";

/// What a stream of client bytes came to.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A request of this many bytes (head and body) was forwarded, naming
    /// this host.
    Req(String, usize),
    /// A refusal of the request naming this host, with its reason.
    Refused(String, &'static str),
    /// The rest (this many bytes) is opaque.
    Opaque(usize),
    /// The rest (this many bytes) cannot be followed.
    Lost(&'static str, usize),
}

/// Drive `Requests` over `input` delivered `step` bytes at a time, as the
/// proxy does: forwarded bytes leave the buffer, the end of the input is
/// the client ending its side.
fn drive(e: &Engine, input: &[u8], step: usize) -> Vec<Seen> {
    let dst: SocketAddr = DST.parse().expect("addr");
    let mut reqs = Requests::new(e, who(), dst, Some(b"chatwall-test"), true);
    let mut findings = Findings::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut out: Vec<Seen> = Vec::new();
    let mut cur: Option<(String, usize)> = None;
    let finish = |cur: &mut Option<(String, usize)>, out: &mut Vec<Seen>| {
        if let Some((h, n)) = cur.take() {
            out.push(Seen::Req(h, n));
        }
    };
    // Each round either forwards, feeds or ends.
    for _ in 0..(input.len() * 4 + 16) {
        let cue = if fed == input.len() {
            ReqCue::Ended
        } else {
            ReqCue::Bytes
        };
        match reqs.step(&buf, cue, &mut findings) {
            // The server switched protocols, as asked.
            Step::NeedMore if reqs.awaiting_switch() => reqs.switched(Some(true)),
            Step::NeedMore if fed == input.len() => break,
            Step::NeedMore => {
                let end = (fed + step).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Step::Forward { len, request } => {
                assert!(
                    len > 0 && len <= buf.len(),
                    "forward {len} of {}",
                    buf.len()
                );
                if let Some(r) = request {
                    finish(&mut cur, &mut out);
                    cur = Some((r.host.clone(), 0));
                }
                if let Some((_, n)) = cur.as_mut() {
                    *n += len;
                }
                buf.drain(..len);
            }
            Step::Refuse { refusal, request } | Step::Reset { refusal, request } => {
                finish(&mut cur, &mut out);
                let reason = match refusal {
                    Refusal::Blocked(d) => d.reason.as_str(),
                    Refusal::Loop => "loop",
                    Refusal::DeniedDestination(_) => "destination",
                    Refusal::ClosedBeforeSending => "closed",
                    Refusal::Malformed(_) => "malformed",
                };
                out.push(Seen::Refused(request.host.clone(), reason));
                return out;
            }
            Step::Opaque => {
                finish(&mut cur, &mut out);
                out.push(Seen::Opaque(buf.len() + input.len() - fed));
                return out;
            }
            Step::Lost(why) => {
                finish(&mut cur, &mut out);
                out.push(Seen::Lost(why, buf.len() + input.len() - fed));
                return out;
            }
        }
    }
    finish(&mut cur, &mut out);
    out
}

/// The same outcome whichever way the bytes are split.
fn drive_all(e: &Engine, input: &[u8]) -> Vec<Seen> {
    let whole = drive(e, input, input.len().max(1));
    for step in [1, 2, 3, 7, 64] {
        assert_eq!(
            drive(e, input, step),
            whole,
            "split every {step} bytes: {}",
            String::from_utf8_lossy(input)
        );
    }
    whole
}

fn req(host: &str, n: usize) -> Seen {
    Seen::Req(host.to_string(), n)
}

#[test]
fn pipelined_requests_are_followed_one_by_one() {
    let e = engine("");
    let a = "GET /a HTTP/1.1\r\nHost: one.example\r\nConnection: keep-alive\r\n\r\n";
    let b = "POST /b HTTP/1.1\r\nhOST: two.example\r\nContent-Length: 5\r\n\r\nhello";
    let c = "PUT /c HTTP/1.1\r\nHost: three.example\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n";
    let d = "HEAD /d HTTP/1.0\r\n\r\n";
    let all = format!("{a}{b}{c}{d}");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![
            req("one.example", a.len()),
            req("two.example", b.len()),
            req("three.example", c.len()),
            req("198.51.100.7", d.len()),
        ]
    );
}

#[test]
fn an_im_request_is_refused_where_it_starts() {
    let e = engine("");
    let a = "GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n";
    let b = "GET / HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n";
    let all = format!("{a}{b}GET /never HTTP/1.1\r\n\r\n");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![
            req("www.example.org", a.len()),
            Seen::Refused("web.whatsapp.com".into(), "host")
        ]
    );
}

#[test]
fn body_rules_hold_the_head_until_the_body_decides() {
    let e = engine("");
    // An XMPP BOSH body in a chunked POST, split across chunks.
    let body = "<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='example.org'/>";
    let (x, y) = body.split_at(25);
    let post = format!(
        "POST /http-bind HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{x}\r\n{:x}\r\n{y}\r\n0\r\n\r\n",
        x.len(),
        y.len()
    );
    let got = drive_all(&e, post.as_bytes());
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        matches!(&got[0], Seen::Refused(h, "http") if h == "chat.example"),
        "{got:?}"
    );
    // The same head with an ordinary body passes, head and body.
    let ok = "POST /http-bind HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/xml\r\nContent-Length: 7\r\n\r\n<a/>xyz";
    assert_eq!(
        drive_all(&e, ok.as_bytes()),
        vec![req("chat.example", ok.len())]
    );
}

#[test]
fn upgrades_and_connect_end_http_and_h2c_is_refused() {
    let e = engine("");
    let ws = "GET /chat HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let frames = "\u{81}\u{5}hello GET /x HTTP/1.1\r\n\r\n";
    let all = format!("{ws}{frames}");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![req("a.example", ws.len()), Seen::Opaque(frames.len())]
    );
    let connect = "CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n";
    let all = format!("{connect}\u{16}\u{3}\u{1}");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![req("b.example", connect.len()), Seen::Opaque(3)]
    );
    for offer in [
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Upgrade: websocket, H2C\r\nConnection: upgrade\r\n",
        "Upgrade: h2c\r\nConnection: HTTP2-Settings\r\n",
    ] {
        let h2c = format!("GET / HTTP/1.1\r\nHost: c.example\r\n{offer}\r\n");
        assert_eq!(
            drive_all(&e, h2c.as_bytes()),
            vec![Seen::Refused("c.example".into(), "http")],
            "{offer}"
        );
    }
}

#[test]
fn what_servers_could_read_differently_is_refused_with_400() {
    let e = engine("");
    let ok = "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
    // RFC 9112 §3.2 and §6.3: a server must answer these with 400; none
    // of it goes on, once the names and rules had their say.
    let cases: &[(&str, &str)] = &[
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: web.whatsapp.com:80:80\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: web.whatsapp.com:80 x\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: a..example\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", ""),
        ("GET / HTTP/1.1\r\nHost: a\r\nX Y: z\r\n\r\n", ""),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "a",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "a",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "a",
        ),
    ];
    for (bad, host) in cases {
        let all = format!("{ok}{bad}");
        assert_eq!(
            drive_all(&e, all.as_bytes()),
            vec![
                req("a.example", ok.len()),
                Seen::Refused(host.to_string(), "malformed")
            ],
            "{bad}"
        );
    }
    // An IM request with odd framing is still the IM request.
    let im = "POST / HTTP/1.1\r\nHost: web.whatsapp.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(
        drive_all(&e, im.as_bytes()),
        vec![Seen::Refused("web.whatsapp.com".into(), "host")]
    );
    // Bytes that are no HTTP request line: not followed (the generic rules
    // apply to them); a client that leaves inside a head likewise.
    for (bad, why) in [
        ("\u{0}\u{1}SSH-2.0-x\r\n", "not an HTTP/1.x request"),
        (
            "GET / HTTP/1.1\r\nHost",
            "the client ended inside a request head",
        ),
    ] {
        let all = format!("{ok}{bad}");
        assert_eq!(
            drive_all(&e, all.as_bytes()),
            vec![req("a.example", ok.len()), Seen::Lost(why, bad.len())],
            "{bad}"
        );
    }
    // A chunked body whose framing breaks past the body rules' window: the
    // head went on, so the stream is reset (no page fits).
    let head = "PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body = format!("800\r\n{}\r\n5\r\nhelloXX", "b".repeat(0x800));
    let broken = format!("{head}{body}");
    assert_eq!(
        drive(&e, broken.as_bytes(), broken.len()),
        vec![
            req("a", head.len()),
            Seen::Refused(String::new(), "malformed")
        ]
    );
    // Broken inside the window: the head was held and never went.
    let early = format!("{head}5\r\nhelloXX");
    assert_eq!(
        drive(&e, early.as_bytes(), early.len()),
        vec![Seen::Refused("a".into(), "malformed")]
    );
    // A head past the limit.
    let e = engine("[limits]\nmax_request_head_bytes = 1024\n");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(2000)
    );
    assert_eq!(
        drive(&e, big.as_bytes(), big.len()),
        vec![Seen::Refused(String::new(), "malformed")]
    );
}

#[test]
fn the_target_and_the_host_field_are_both_decided() {
    let e = engine("");
    for im in [
        "GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n",
        "GET http://allowed.example/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n",
        "CONNECT web.whatsapp.com:443 HTTP/1.1\r\nHost: allowed.example\r\n\r\n",
    ] {
        let got = drive_all(&e, im.as_bytes());
        assert_eq!(got.len(), 1, "{im}: {got:?}");
        assert!(matches!(&got[0], Seen::Refused(_, "host")), "{im}: {got:?}");
    }
    let fine = "GET http://allowed.example/x HTTP/1.1\r\nHost: allowed.example\r\n\r\n";
    assert_eq!(
        drive_all(&e, fine.as_bytes()),
        vec![req("allowed.example", fine.len())]
    );
}

#[test]
fn after_an_upgrade_the_server_says_whether_http_goes_on() {
    let e = engine("");
    let dst: SocketAddr = DST.parse().expect("addr");
    let up =
        b"GET /chat HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n";
    let next = b"GET / HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n";
    for switched in [Some(false), Some(true), None] {
        let mut reqs = Requests::new(&e, who(), dst, None, false);
        let mut f = Findings::default();
        assert!(matches!(
            reqs.step(up, ReqCue::Bytes, &mut f),
            Step::Forward {
                request: Some(_),
                ..
            }
        ));
        // Nothing passes until the response says.
        assert!(reqs.awaiting_switch());
        assert!(matches!(
            reqs.step(next, ReqCue::Bytes, &mut f),
            Step::NeedMore
        ));
        reqs.switched(switched);
        let step = reqs.step(next, ReqCue::Bytes, &mut f);
        match switched {
            Some(false) => assert!(matches!(step, Step::Refuse { .. }), "{step:?}"),
            Some(true) => assert!(matches!(step, Step::Opaque), "{step:?}"),
            None => assert!(matches!(step, Step::Lost(_)), "{step:?}"),
        }
    }
}

#[test]
fn a_request_that_already_came_through_here_is_a_loop() {
    let e = engine("");
    let looped = "GET / HTTP/1.1\r\nHost: a.example\r\nVia: 1.1 other, 1.1 chatwall-test\r\n\r\n";
    assert_eq!(
        drive_all(&e, looped.as_bytes()),
        vec![Seen::Refused("a.example".into(), "loop")]
    );
    let chained = "GET / HTTP/1.1\r\nHost: a.example\r\nVia: 1.1 chatwall-other\r\n\r\n";
    assert_eq!(
        drive_all(&e, chained.as_bytes()),
        vec![req("a.example", chained.len())]
    );
}

#[test]
fn a_held_body_is_decided_at_the_deadline_on_what_came() {
    let e = engine("");
    let dst: SocketAddr = DST.parse().expect("addr");
    let mut reqs = Requests::new(&e, who(), dst, None, false);
    let mut f = Findings::default();
    // A POST that body rules apply to, whose body does not come: decided
    // on the head when the hold deadline passes.
    let head = b"POST /http-bind HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/xml\r\nContent-Length: 80\r\n\r\n";
    assert!(matches!(
        reqs.step(head, ReqCue::Bytes, &mut f),
        Step::NeedMore
    ));
    assert!(reqs.holding());
    match reqs.step(head, ReqCue::Deadline, &mut f) {
        Step::Forward {
            len,
            request: Some(_),
        } => assert_eq!(len, head.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn expect_100_continue_sends_the_head_and_holds_the_body() {
    let e = engine("");
    // The client waits for the server's 100 before its body: the head goes
    // at once, the body is held until the body rules decide.
    let head = "POST /http-bind HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/xml\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n";
    let bosh = "<body rid='1' xmlns='http://jabber.org/protocol/httpbind'/>";
    let h = head.replace("{}", &bosh.len().to_string());
    let dst: SocketAddr = DST.parse().expect("addr");
    let mut reqs = Requests::new(&e, who(), dst, None, false);
    let mut f = Findings::default();
    match reqs.step(h.as_bytes(), ReqCue::Bytes, &mut f) {
        Step::Forward {
            len,
            request: Some(_),
        } => assert_eq!(len, h.len()),
        other => panic!("the head goes at once: {other:?}"),
    }
    // No deadline holds the body's fate: it waits for the body itself.
    assert!(!reqs.holding());
    for cue in [ReqCue::Bytes, ReqCue::Deadline] {
        assert!(matches!(reqs.step(b"", cue, &mut f), Step::NeedMore));
    }
    // An IM body is refused by reset (the head is upstream already).
    let all = format!("{h}{bosh}");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![
            req("chat.example", h.len()),
            Seen::Refused("chat.example".into(), "http")
        ]
    );
    // An ordinary body passes: head and body are one request.
    let ok = head.replace("{}", "7");
    let all = format!("{ok}<a/>xyz");
    assert_eq!(
        drive_all(&e, all.as_bytes()),
        vec![req("chat.example", all.len())]
    );
}

#[test]
fn first_bytes_cues_decide_as_the_tunnel_would() {
    let e = engine("");
    let mut f = Findings::default();
    let mut tls = FirstBytes::new(&e, who(), 443, false, false);
    // Silence on 443 past the deadline is not TLS.
    assert!(matches!(
        tls.step(&[], Cue::Deadline, &mut f),
        Err(Refusal::Blocked(d)) if d.reason == Reason::NonTls
    ));
    let mut smtp = FirstBytes::new(&e, who(), 25, false, false);
    assert_eq!(
        smtp.step(&[], Cue::UpstreamFirst, &mut f),
        Ok(Some(First::Payload))
    );
    let mut http = FirstBytes::new(&e, who(), 8080, false, false);
    assert_eq!(http.step(b"GE", Cue::Bytes, &mut f), Ok(None));
    assert_eq!(
        http.step(b"GET / HTTP/1.1\r\n", Cue::Bytes, &mut f),
        Ok(Some(First::Http))
    );
    let mut closed = FirstBytes::new(&e, who(), 8080, false, false);
    assert_eq!(
        closed.step(&[], Cue::ClientEnded, &mut f),
        Err(Refusal::ClosedBeforeSending)
    );
}
