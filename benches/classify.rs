//! Classification micro-benchmarks: what deciding one flow costs in CPU.
//!
//! - `host`: `SignatureSet::classify_host` per name, cycling through a list
//!   of realistic names (blocked exact and wildcard names, allowed names,
//!   deep CDN-style subdomains, IDN in Unicode and punycode form). One
//!   iteration is one name, so the reported time is the time per name.
//! - `client_hello`: `inspect_client_hello` on a 517-byte browser hello and
//!   a 1.8 KB post-quantum one (X25519MLKEM768 key share), in bytes/s.
//! - `payload`: the bundled payload automaton, `payload().classify(Client,
//!   buf)`, in bytes/s. First on realistic first windows: a TLS hello, an
//!   HTTP request head, an SSH banner, and 16 KiB of random bytes (the
//!   whole inspection window a tunnel of unknown bytes fills). `classify`
//!   only looks at the first `reach()` bytes, the furthest any client rule
//!   can match (printed at start-up; 1024 for the bundled set), so the
//!   16 KiB figure is the rate at which whole windows are decided, not a
//!   scan rate. The scan rate is `random_1MiB_in_<reach>B_windows`: 1 MiB
//!   of random bytes cut into reach-sized windows, each classified, so
//!   every byte goes through the automaton once.
//! - `verdict`: one whole flow decision as a CONNECT tunnel makes it: the
//!   destination name (allow-list, host and port rules, policy), then the
//!   ClientHello (parse, allow-list, `classify_hello`, ECH, policy), with
//!   the engine `Engine::build(Config::load_default())`.
//! - `signatures`: compiling the bundled set (`SignatureSet::bundled`).
//! - `scaling`: the per-flow cost as the signature set grows. The bundled
//!   files plus one generated app holding (k - 1) times the bundled set's
//!   count of exact names, wildcard suffixes, CIDR prefixes and payload
//!   rules (k = 1, 10, 100): the `verdict` flows, an address lookup, and a
//!   16 KiB random window through the payload matcher. The generated
//!   payload rules copy the bundled ones' shapes (direction, anchors,
//!   offsets, `within` bounds, lengths, case folding) with bytes of their
//!   own (see `synthetic_payload`), and stop at the set's limit of 4,096
//!   per direction (about 80x for the client direction). Printed at the
//!   end: each figure at 10x and 100x over 1x.
//!
//! Run: `cargo bench --bench classify -- --measurement-time 3 --warm-up-time 1`
//! (add a filter such as `payload` to run one group).
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use chatwall::classify::payload::Direction;
use chatwall::classify::tls::inspect_client_hello;
use chatwall::config::Config;
use chatwall::decide::{self, Cue, Findings, First, FirstBytes, Refusal};
use chatwall::engine::Engine;
use chatwall::policy::{Verdict, Who};
use chatwall::signatures::{RuleKind, SignatureSet};

#[allow(dead_code)]
#[path = "../fuzz/src/fixtures.rs"]
mod fixtures;

use fixtures::XorShift;

/// The default inspection window (`[inspect] client_bytes`).
const WINDOW: usize = 16 * 1024;

/// Host names by kind; each kind is one benchmark.
const HOSTS: &[(&str, &[&str])] = &[
    (
        "blocked",
        &[
            "web.whatsapp.com",
            "whatsapp.com",
            "mmg.whatsapp.net",
            "telegram.org",
            "web.telegram.org",
            "discord.com",
            "gateway.discord.gg",
            "teams.microsoft.com",
            "matrix.org",
            "line.me",
        ],
    ),
    (
        "allowed",
        &[
            "www.google.com",
            "github.com",
            "en.wikipedia.org",
            "www.example.org",
            "login.microsoftonline.com",
            "cdn.jsdelivr.net",
            "fonts.gstatic.com",
            "www.bbc.co.uk",
            "api.stripe.com",
            "registry.npmjs.org",
        ],
    ),
    (
        "deep",
        &[
            "rr3---sn-4g5e6nsz.googlevideo.com",
            "e12345.dscb.akamaiedge.net",
            "a.b.c.d.e.f.g.h.example.co.uk",
            "s3.dualstack.eu-west-1.amazonaws.com",
            "media-ams4-1.cdn.whatsapp.net",
            "x.y.z.static.web.telegram.org",
            "ip-10-0-0-1.eu-central-1.compute.internal",
            "WWW.Very.Deep.Sub.Domain.Example.COM.",
        ],
    ),
    (
        "idn",
        &[
            "bücher.example",
            "xn--bcher-kva.example",
            "пример.рф",
            "例え.テスト",
            "münchen.de",
            "www.аррӏе.com",
        ],
    ),
];

fn bench_hosts(c: &mut Criterion) {
    let set = bundled();
    let mut group = c.benchmark_group("host");
    group.throughput(Throughput::Elements(1));
    for (kind, names) in HOSTS {
        let mut next = 0;
        group.bench_function(BenchmarkId::new("classify_host", kind), |b| {
            b.iter(|| {
                let name = names[next % names.len()];
                next += 1;
                set.classify_host(black_box(name))
            })
        });
    }
    group.finish();
}

fn bench_client_hello(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_hello");
    for (name, hello) in hellos() {
        group.throughput(Throughput::Bytes(hello.len() as u64));
        group.bench_function(BenchmarkId::new("inspect", name), |b| {
            b.iter(|| inspect_client_hello(black_box(&hello)))
        });
    }
    group.finish();
}

/// The two hellos of the `client_hello` group, named with their size.
fn hellos() -> [(String, Vec<u8>); 2] {
    [false, true].map(|post_quantum| {
        let hello = fixtures::browser_hello("www.example.org", post_quantum);
        let kind = if post_quantum {
            "post_quantum"
        } else {
            "browser"
        };
        (format!("{kind}_{}B", hello.len()), hello)
    })
}

fn bench_payload(c: &mut Criterion) {
    let set = bundled();
    let matcher = set.payload();
    eprintln!(
        "payload: {} rules, client reach {} bytes, server reach {} bytes",
        matcher.rule_count(),
        matcher.reach(Direction::Client),
        matcher.reach(Direction::Server)
    );
    let mut rng = XorShift(0x5eed_1234_abcd_ef01);
    let windows: [(&str, Vec<u8>); 4] = [
        (
            "tls_hello",
            fixtures::browser_hello("www.example.org", false),
        ),
        ("http_head", fixtures::http_request_head()),
        ("ssh_banner", fixtures::ssh_banner()),
        ("random_16KiB", rng.bytes(WINDOW)),
    ];
    let mut group = c.benchmark_group("payload");
    for (name, buf) in &windows {
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_function(BenchmarkId::new("classify_client", name), |b| {
            b.iter(|| matcher.classify(Direction::Client, black_box(buf)))
        });
    }
    // Cut 1 MiB into windows of the client reach, so that every byte is
    // scanned once (a longer window would be cut there by `classify`).
    let reach = matcher.reach(Direction::Client).clamp(1, WINDOW);
    let big = rng.bytes(1 << 20);
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function(
        BenchmarkId::new(
            "classify_client",
            format!("random_1MiB_in_{reach}B_windows"),
        ),
        |b| {
            b.iter(|| {
                for window in black_box(&big).chunks(reach) {
                    black_box(matcher.classify(Direction::Client, window));
                }
            })
        },
    );
    group.finish();
}

/// One CONNECT flow: `host` is the authority, `hello` the first bytes.
struct Flow {
    name: &'static str,
    host: &'static str,
    hello: Vec<u8>,
}

fn bench_verdict(c: &mut Criterion) {
    let engine = match Config::load_default().map_err(|e| e.to_string()) {
        Ok(cfg) => Engine::build(cfg).unwrap_or_else(|e| panic!("engine: {e:?}")),
        Err(e) => panic!("default configuration: {e}"),
    };
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let flows = [
        Flow {
            name: "allowed_tls",
            host: "www.example.org",
            hello: fixtures::browser_hello("www.example.org", false),
        },
        Flow {
            name: "allowed_tls_post_quantum",
            host: "www.example.org",
            hello: fixtures::browser_hello("www.example.org", true),
        },
        Flow {
            name: "blocked_by_sni",
            host: "front.example.net",
            hello: fixtures::browser_hello("web.whatsapp.com", false),
        },
        Flow {
            name: "blocked_by_host",
            host: "web.whatsapp.com",
            hello: fixtures::browser_hello("web.whatsapp.com", false),
        },
    ];
    let mut group = c.benchmark_group("verdict");
    group.throughput(Throughput::Elements(1));
    for flow in &flows {
        let expected = decide(&engine, client, flow).as_str();
        eprintln!("verdict/{}: {expected}", flow.name);
        group.bench_function(BenchmarkId::new("connect_tls", flow.name), |b| {
            b.iter(|| decide(&engine, client, black_box(flow)))
        });
    }
    group.finish();
}

/// The decision a CONNECT to `flow.host:443` whose first bytes are
/// `flow.hello` gets: `decide::name`, then `decide::FirstBytes` on the
/// hello, as the proxy's tunnel calls them.
fn decide(engine: &Engine, client: IpAddr, flow: &Flow) -> Verdict {
    let who = Who::ip(client);
    let mut findings = Findings::default();
    let decided =
        decide::name(engine, &who, flow.host, 443, &mut findings).and_then(|allowlisted| {
            let mut first = FirstBytes::new(engine, who.clone(), 443, allowlisted, false);
            match first.step(&flow.hello, Cue::Bytes, &mut findings)? {
                Some(First::Tls) => Ok(()),
                other => panic!("{}: the hello must parse as TLS, got {other:?}", flow.name),
            }
        });
    match decided {
        Err(Refusal::Blocked(d)) => Verdict::Block(d),
        Err(other) => panic!("{}: {other:?}", flow.name),
        Ok(()) => findings.verdict(),
    }
}

fn bench_compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("signatures");
    group.sample_size(10);
    group.bench_function("compile_bundled", |b| {
        b.iter(|| SignatureSet::bundled(black_box(WINDOW)))
    });
    group.finish();
}

fn bundled() -> SignatureSet {
    SignatureSet::bundled(WINDOW).unwrap_or_else(|e| panic!("bundled set: {e:?}"))
}

/// A signature directory: the bundled files and one generated app with
/// `(k - 1)` times the bundled counts of names, suffixes, CIDRs and
/// payload patterns.
fn scaled_dir(k: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("signatures");
    for entry in std::fs::read_dir(&bundled).expect("bundled signatures") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        std::fs::copy(&path, dir.path().join(name)).expect("copy");
    }
    let set = bundled_set();
    let count = |kind: RuleKind| set.rules().iter().filter(|r| r.kind == kind).count().max(1);
    let (hosts, cidrs) = (count(RuleKind::Host), count(RuleKind::Cidr));
    let extra = k.saturating_sub(1);
    if extra > 0 {
        let mut text =
            String::from("id = \"synthetic\"\nname = \"Synthetic\"\ncategory = \"consumer-im\"\n");
        let quoted = |v: Vec<String>| {
            v.iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let names: Vec<String> = (0..hosts * extra)
            .map(|i| {
                if i % 2 == 0 {
                    format!("h{i}.n{}.synthetic.example", i % 97)
                } else {
                    format!("*.s{i}.synthetic.example")
                }
            })
            .collect();
        text.push_str(&format!(
            "\n[[hosts]]\nnames = [{}]\nsource = \"generated\"\n",
            quoted(names)
        ));
        let nets: Vec<String> = (0..cidrs * extra)
            .map(|i| format!("100.{}.{}.0/24", 64 + (i / 256) % 64, i % 256))
            .collect();
        text.push_str(&format!(
            "\n[[cidrs]]\nnets = [{}]\nsource = \"generated\"\n",
            quoted(nets)
        ));
        text.push_str(&synthetic_payload(&bundled, extra));
        std::fs::write(dir.path().join("synthetic.toml"), text).expect("write");
    }
    dir
}

/// `[[payload]]` rules like the bundled ones, `extra` times over: each bundled
/// rule in turn (files in name order) with the same direction and the same
/// shape (atoms, their `offset` or `within`, lengths, `nocase`), but bytes of
/// its own: pseudo-random bytes for a `hex` atom, pseudo-random letters and
/// digits for an `ascii` one. So the mix of anchored magic at the start of a
/// stream, anchored atoms further in and floating atoms is the bundled one.
/// A direction holds at most 4,096 payload rules (the set refuses more): the
/// generated rules of a direction stop 64 short of that.
fn synthetic_payload(bundled: &std::path::Path, extra: usize) -> String {
    let mut files: Vec<_> = std::fs::read_dir(bundled)
        .expect("bundled signatures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut templates: Vec<toml::Table> = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read");
        let table: toml::Table = text.parse().expect("bundled file parses");
        if let Some(toml::Value::Array(rules)) = table.get("payload") {
            templates.extend(rules.iter().filter_map(|r| r.as_table().cloned()));
        }
    }
    let direction = |t: &toml::Table| {
        t.get("direction")
            .and_then(|d| d.as_str())
            .unwrap_or("client")
            .to_string()
    };
    let mut room: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for t in &templates {
        *room.entry(direction(t)).or_insert(4096 - 64) -= 1;
    }
    let mut rng = XorShift(0x5ca1_ab1e);
    let mut text = String::new();
    for _ in 0..extra {
        for t in &templates {
            let dir = direction(t);
            let Some(left) = room.get_mut(&dir).filter(|left| **left > 0) else {
                continue;
            };
            *left -= 1;
            let atoms: Vec<String> = t
                .get("match")
                .and_then(|m| m.as_array())
                .expect("payload.match")
                .iter()
                .map(|atom| {
                    let atom = atom.as_table().expect("atom table");
                    let mut fields = Vec::new();
                    if let Some(ascii) = atom.get("ascii").and_then(|a| a.as_str()) {
                        const ALNUM: &[u8] =
                            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
                        let bytes: String = (0..ascii.len())
                            .map(|_| char::from(ALNUM[rng.next_u64() as usize % ALNUM.len()]))
                            .collect();
                        fields.push(format!("ascii = \"{bytes}\""));
                    }
                    if let Some(hex) = atom.get("hex").and_then(|h| h.as_str()) {
                        let bytes: Vec<String> = hex
                            .split_whitespace()
                            .map(|_| format!("{:02X}", rng.next_u64() as u8))
                            .collect();
                        fields.push(format!("hex = \"{}\"", bytes.join(" ")));
                    }
                    for key in ["offset", "within", "nocase"] {
                        if let Some(value) = atom.get(key) {
                            fields.push(format!("{key} = {value}"));
                        }
                    }
                    format!("{{ {} }}", fields.join(", "))
                })
                .collect();
            text.push_str(&format!(
                "\n[[payload]]\ndirection = \"{dir}\"\nmatch = [{}]\nsource = \"generated\"\n",
                atoms.join(", ")
            ));
        }
    }
    text
}

fn bundled_set() -> SignatureSet {
    bundled()
}

fn bench_scaling(c: &mut Criterion) {
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let flows = [
        Flow {
            name: "allowed_tls",
            host: "www.example.org",
            hello: fixtures::browser_hello("www.example.org", false),
        },
        Flow {
            name: "blocked_by_sni",
            host: "front.example.net",
            hello: fixtures::browser_hello("web.whatsapp.com", false),
        },
    ];
    let mut rng = XorShift(7);
    let window: Vec<u8> = (0..WINDOW).map(|_| rng.next_u64() as u8).collect();
    let mut group = c.benchmark_group("scaling");
    let mut medians: Vec<(String, usize, f64)> = Vec::new();
    for k in [1usize, 10, 100] {
        let dir = scaled_dir(k);
        let cfg_dir = tempfile::tempdir().expect("tempdir");
        let path = cfg_dir.path().join("chatwall.toml");
        std::fs::write(
            &path,
            format!(
                "[signatures]\ndir = {:?}\n",
                dir.path().display().to_string()
            ),
        )
        .expect("write config");
        let engine = Engine::build(Config::load(Some(&path)).expect("config")).expect("engine");
        eprintln!("scaling/{k}x: {} rules", engine.signatures.rules().len());
        let mut time = |name: &str, f: &mut dyn FnMut()| {
            let start = std::time::Instant::now();
            let n = 20_000;
            for _ in 0..n {
                f();
            }
            medians.push((
                name.to_string(),
                k,
                start.elapsed().as_secs_f64() * 1e9 / n as f64,
            ));
        };
        for flow in &flows {
            time(flow.name, &mut || {
                black_box(decide(&engine, client, black_box(flow)));
            });
            group.bench_function(BenchmarkId::new(flow.name, format!("{k}x")), |b| {
                b.iter(|| decide(&engine, client, black_box(flow)))
            });
        }
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        time("address", &mut || {
            black_box(engine.signatures.classify_ip(black_box(ip)));
        });
        group.bench_function(BenchmarkId::new("address", format!("{k}x")), |b| {
            b.iter(|| engine.signatures.classify_ip(black_box(ip)))
        });
        time("payload_16KiB_random", &mut || {
            black_box(
                engine
                    .signatures
                    .payload()
                    .classify(Direction::Client, black_box(&window)),
            );
        });
        group.bench_function(
            BenchmarkId::new("payload_16KiB_random", format!("{k}x")),
            |b| {
                b.iter(|| {
                    engine
                        .signatures
                        .payload()
                        .classify(Direction::Client, black_box(&window))
                })
            },
        );
    }
    group.finish();
    // Quick ratios from the loops above (20,000 runs each).
    for name in [
        "allowed_tls",
        "blocked_by_sni",
        "address",
        "payload_16KiB_random",
    ] {
        let at = |k: usize| {
            medians
                .iter()
                .find(|(n, kk, _)| n == name && *kk == k)
                .map_or(f64::NAN, |m| m.2)
        };
        eprintln!(
            "scaling/{name}: {:.0} ns at 1x; 10x/1x {:.2}, 100x/1x {:.2}",
            at(1),
            at(10) / at(1),
            at(100) / at(1)
        );
    }
}

criterion_group!(
    benches,
    bench_hosts,
    bench_client_hello,
    bench_payload,
    bench_verdict,
    bench_compile,
    bench_scaling
);
criterion_main!(benches);
