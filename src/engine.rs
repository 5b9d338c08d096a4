//! One snapshot of configuration, signature set and policy, built together.
//! A flow takes the snapshot once at its start; a reload builds a complete
//! new one and swaps it whole, so no verdict changes mid-flow.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::classify::tls::ClientHello;
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::Config;
use crate::policy::Policy;
use crate::signatures::SignatureSet;
use crate::tls_inspect::interception::Interception;

static GENERATION: AtomicU64 = AtomicU64::new(0);

pub struct Engine {
    pub config: Arc<Config>,
    pub signatures: SignatureSet,
    pub policy: Policy,
    /// TLS inspection's CA, leaf cache and upstream trust (with
    /// `[tls_inspect] enabled`).
    pub tls: Option<Arc<Interception>>,
    /// The directory of `[ldap]`, with this snapshot's cache of groups.
    pub directory: Option<Arc<crate::directory::Directory>>,
    /// Download URLs whose body matched a `[[downloads]] sha256` rule: the
    /// next request for one is refused with the page before any byte.
    pub blocked_downloads: BlockedDownloads,
    pub generation: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("generation", &self.generation)
            .field("signatures", &self.signatures)
            .finish()
    }
}

impl Engine {
    /// Load the signature set the configuration names and resolve the
    /// policy. Errors are whole lines, ready to print.
    pub fn build(config: Config) -> Result<Engine, Vec<String>> {
        let window = config.inspect_bytes;
        let signatures = match &config.signatures_dir {
            Some(dir) => SignatureSet::from_dir(dir, window),
            None => SignatureSet::bundled(window),
        }
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let policy = Policy::new(&config.policy, &signatures).map_err(|errs| {
            let file = config
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "<defaults>".into());
            let text = config
                .path
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            errs.into_iter()
                .map(|e| {
                    crate::config::ConfigError {
                        file: file.clone(),
                        line: crate::config::locate(&text, e.section, &e.key),
                        field: format!("{}.{}", e.section, e.key),
                        message: e.message,
                    }
                    .to_string()
                })
                .collect::<Vec<_>>()
        })?;
        let tls = if config.tls_inspect.enabled {
            check_tls_selections(&config, &signatures)?;
            let i = Interception::load(&config.tls_inspect).map_err(|e| vec![e])?;
            Some(Arc::new(i))
        } else {
            None
        };
        let directory = match &config.ldap {
            Some(l) => Some(Arc::new(
                crate::directory::Directory::new(l).map_err(|e| vec![e])?,
            )),
            None => None,
        };
        Ok(Engine {
            config: Arc::new(config),
            signatures,
            policy,
            tls,
            directory,
            blocked_downloads: BlockedDownloads::default(),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }
}

/// Download URLs (host and target) refused on their body's digest, with
/// the detection; bounded, the oldest forgotten first. Emptied by a reload
/// (a new engine).
#[derive(Debug, Default)]
pub struct BlockedDownloads {
    inner: std::sync::Mutex<BlockedInner>,
}

#[derive(Debug, Default)]
struct BlockedInner {
    map: std::collections::HashMap<Box<str>, Detection>,
    order: std::collections::VecDeque<Box<str>>,
}

impl BlockedDownloads {
    /// URLs remembered at most.
    pub const CAPACITY: usize = 4096;

    pub fn get(&self, url: &str) -> Option<Detection> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.map.get(url).copied()
    }

    pub fn insert(&self, url: &str, d: Detection) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.map.insert(url.into(), d).is_none() {
            inner.order.push_back(url.into());
            while inner.order.len() > Self::CAPACITY {
                if let Some(old) = inner.order.pop_front() {
                    inner.map.remove(&old);
                }
            }
        }
    }
}

/// `app:` and `category:` entries of `[tls_inspect]` name apps and
/// categories the signature set has.
fn check_tls_selections(config: &Config, signatures: &SignatureSet) -> Result<(), Vec<String>> {
    use crate::config::Select;
    let t = &config.tls_inspect;
    let text = config
        .path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let file = config
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<defaults>".into());
    let mut errors = Vec::new();
    for (key, list) in [("decrypt", &t.decrypt), ("never", &t.never)] {
        for s in list {
            let known = match s {
                Select::App(id) => signatures.apps().iter().any(|a| &a.id == id),
                Select::Category(c) => signatures.apps().iter().any(|a| &a.category == c),
                _ => true,
            };
            if !known {
                errors.push(
                    crate::config::ConfigError {
                        file: file.clone(),
                        line: crate::config::locate(&text, "tls_inspect", key),
                        field: format!("tls_inspect.{key}"),
                        message: format!("{s:?} names no app or category of the signature set"),
                    }
                    .to_string(),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

impl Engine {
    /// What a destination name (or address literal) and port alone say,
    /// before any lookup: `None` when it is on the allow-list, else the
    /// detections by name or address and by port, for the caller's policy
    /// step. The proxy and `classify pcap` both decide through this.
    pub fn name_evidence(&self, host: &str, port: u16) -> Option<[Option<Detection>; 2]> {
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok();
        let allowlisted = match literal {
            Some(ip) => self.policy.allows_addr(ip),
            None => self.policy.allows_name(host),
        };
        if allowlisted {
            return None;
        }
        let by_name = match literal {
            Some(ip) => self.signatures.classify_ip(ip),
            None => self.signatures.classify_host(host),
        };
        Some([by_name, self.signatures.classify_port(port)])
    }

    /// What a ClientHello says: its SNI, ALPN or JA4 (unless the SNI is on
    /// the allow-list), every further host name of a server_name list that
    /// holds several (each unless it is on the allow-list itself), and ECH or
    /// legacy ESNI. An allow-listed first name does not vouch for the others:
    /// a server may act on any of them.
    pub fn hello_evidence<'a>(
        &'a self,
        hello: &'a ClientHello,
    ) -> impl Iterator<Item = Option<Detection>> + 'a {
        let sni_allowlisted = hello
            .sni
            .as_deref()
            .is_some_and(|s| self.policy.allows_name(s));
        let named = if sni_allowlisted {
            None
        } else {
            self.signatures.classify_hello(hello)
        };
        let ech = (hello.ech || hello.esni).then_some(Detection {
            app: UNIDENTIFIED,
            rule: None,
            reason: Reason::Ech,
            offset: None,
            exception: None,
        });
        let more = hello.sni_more.iter().map(move |name| {
            if self.policy.allows_name(name) {
                None
            } else {
                self.signatures.classify_sni(name)
            }
        });
        [named, ech].into_iter().chain(more)
    }

    /// What the names of a server's certificate say
    /// ([`crate::classify::server_hello::ServerFlight::Names`]): one item per
    /// name, in order, `None` for a name that is on the allow-list or that no
    /// rule knows, else a detection with [`Reason::Cert`]. Names are matched
    /// as an SNI is; a wildcard name `*.example.com` matches suffix rules
    /// covering all of it and is on the allow-list only if a `*.` pattern
    /// covers all of it.
    ///
    /// Every name counts: a certificate shared by several services (a CDN's,
    /// or one vendor's for all its products) names the flow after whichever
    /// of its names a rule knows, so the caller may want to weigh this
    /// evidence against the SNI it already has.
    pub fn cert_evidence<'a>(
        &'a self,
        names: &'a [String],
    ) -> impl Iterator<Item = Option<Detection>> + 'a {
        names.iter().map(move |name| {
            let allowlisted = match name.strip_prefix("*.") {
                Some(suffix) => self.policy.allows_every_name_under(suffix),
                None => self.policy.allows_name(name),
            };
            if allowlisted {
                None
            } else {
                self.signatures.classify_cert(name)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::tls::{inspect_client_hello, Hello};
    use crate::policy::Verdict;

    fn engine(config: &str) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, config).expect("write config");
        let cfg = Config::load(Some(&path)).expect("config loads");
        Engine::build(cfg).expect("engine builds")
    }

    fn client() -> std::net::IpAddr {
        std::net::IpAddr::from([10, 0, 0, 1])
    }

    /// A ClientHello (RFC 8446 §4.1.2) whose server_name list holds `names`.
    fn hello_naming(names: &[&str]) -> ClientHello {
        let mut list = Vec::new();
        for name in names {
            list.push(0); // host_name
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
        }
        let mut sni = (list.len() as u16).to_be_bytes().to_vec();
        sni.extend(list);
        let mut extensions = vec![0x00, 0x00];
        extensions.extend((sni.len() as u16).to_be_bytes());
        extensions.extend(sni);
        let mut body = vec![0x03, 0x03];
        body.extend([0x5a; 32]); // random
        body.push(0); // legacy_session_id
        body.extend([0x00, 0x02, 0x13, 0x01]); // cipher_suites
        body.extend([0x01, 0x00]); // compression methods
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut message = vec![0x01, 0x00];
        message.extend((body.len() as u16).to_be_bytes());
        message.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend((message.len() as u16).to_be_bytes());
        record.extend(message);
        match inspect_client_hello(&record) {
            Hello::Complete(hello) => *hello,
            other => panic!("not a complete hello: {other:?}"),
        }
    }

    /// The first verdict that refuses, else whether any monitors.
    fn verdict(engine: &Engine, evidence: impl Iterator<Item = Option<Detection>>) -> Verdict {
        let mut outcome = Verdict::Allow;
        for d in evidence {
            match engine.policy.decide(client(), d) {
                v @ Verdict::Block(_) => return v,
                v @ Verdict::Monitor(_) => outcome = v,
                Verdict::Allow => {}
            }
        }
        outcome
    }

    fn app_of(engine: &Engine, v: Verdict) -> Option<(&str, Reason)> {
        v.detection()
            .map(|d| (engine.signatures.app_id(d.app), d.reason))
    }

    #[test]
    fn a_second_host_name_in_the_hello_is_checked() {
        let e = engine("");
        let hello = hello_naming(&["www.ok.example", "web.whatsapp.com"]);
        assert_eq!(hello.sni.as_deref(), Some("www.ok.example"));
        let v = verdict(&e, e.hello_evidence(&hello));
        assert!(v.is_block(), "{v:?}");
        assert_eq!(app_of(&e, v), Some(("whatsapp", Reason::Sni)));

        // The first name on the allow-list does not vouch for the second.
        let e = engine("[[policy.allow]]\nhosts = [\"www.ok.example\"]\n");
        let v = verdict(&e, e.hello_evidence(&hello));
        assert_eq!(app_of(&e, v), Some(("whatsapp", Reason::Sni)));

        // The second name on the allow-list gives nothing.
        let e = engine("[[policy.allow]]\nhosts = [\"*.whatsapp.com\"]\n");
        assert_eq!(verdict(&e, e.hello_evidence(&hello)), Verdict::Allow);

        // One ordinary name: nothing.
        let e = engine("");
        let hello = hello_naming(&["www.ok.example"]);
        assert_eq!(verdict(&e, e.hello_evidence(&hello)), Verdict::Allow);
        assert_eq!(e.hello_evidence(&hello).count(), 2);
    }

    #[test]
    fn stun_turn_is_monitored_by_default() {
        let e = engine("");
        let app = e.signatures.app_index("stun-turn").expect("stun-turn");
        assert_eq!(
            e.policy.app_action(usize::from(app)),
            crate::config::Action::Monitor
        );
        let teams = e.signatures.app_index("teams").expect("teams");
        assert_eq!(
            e.policy.app_action(usize::from(teams)),
            crate::config::Action::Block
        );
    }

    #[test]
    fn categories_of_the_model_are_known_to_any_signature_set() {
        // A directory without a media-relay app still takes the built-in
        // media-relay default, and an explicit entry for it; a misspelt
        // category is still refused.
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/signatures/valid/localhost-host"
        );
        let with = |extra: &str| {
            let text = format!("[signatures]\ndir = \"{dir}\"\n{extra}");
            let tmp = tempfile::tempdir().expect("tempdir");
            let path = tmp.path().join("chatwall.toml");
            std::fs::write(&path, text).expect("write config");
            Engine::build(Config::load(Some(&path)).expect("config loads"))
        };
        assert!(with("").is_ok());
        assert!(with("[policy.categories]\nmedia-relay = \"block\"\n").is_ok());
        let errors = with("[policy.categories]\nmedia-relai = \"block\"\n")
            .expect_err("a misspelt category");
        assert!(
            errors.iter().any(|e| e.contains("media-relai")),
            "{errors:?}"
        );
    }

    /// The verdict of a CONNECT to `host:port` as `decide::name` makes it.
    fn name_verdict(e: &Engine, host: &str, port: u16) -> Verdict {
        let who = crate::policy::Who::ip(client());
        let mut found = crate::decide::Findings::default();
        match crate::decide::name(e, &who, host, port, &mut found) {
            Err(crate::decide::Refusal::Blocked(d)) => Verdict::Block(d),
            _ => found.verdict(),
        }
    }

    #[test]
    fn circumvention_apps_are_monitored_and_never_name_an_im_flow() {
        let e = engine("");
        for id in [
            "public-dns-resolvers",
            "openvpn",
            "tor",
            "web-proxies",
            "nordvpn",
        ] {
            let app = e.signatures.app_index(id).unwrap_or_else(|| panic!("{id}"));
            let app = usize::from(app);
            assert_eq!(e.signatures.apps()[app].category, "circumvention");
            assert_eq!(
                e.policy.app_action(app),
                crate::config::Action::Monitor,
                "{id}"
            );
        }
        let v = name_verdict(&e, "dns.google", 443);
        assert_eq!(app_of(&e, v), Some(("public-dns-resolvers", Reason::Host)));
        assert!(!v.is_block());

        // An IM rule on the same flow names the IM app, whichever comes
        // first and whether the IM app is blocked or only monitored.
        let v = name_verdict(&e, "dns.google", 5222);
        assert!(v.is_block());
        assert_eq!(app_of(&e, v), Some(("xmpp", Reason::Port)));
        let e = engine("[policy]\ndefault = \"monitor\"\n");
        let v = name_verdict(&e, "dns.google", 5222);
        assert_eq!(app_of(&e, v), Some(("xmpp", Reason::Port)), "{v:?}");
        let v = name_verdict(&e, "web.whatsapp.com", 853);
        assert_eq!(app_of(&e, v), Some(("whatsapp", Reason::Host)), "{v:?}");

        // Blocking circumvention leaves the IM apps' actions alone.
        let e = engine(
            "[policy]\ndefault = \"monitor\"\n[policy.categories]\ncircumvention = \"block\"\n",
        );
        let whatsapp = usize::from(e.signatures.app_index("whatsapp").expect("whatsapp"));
        assert_eq!(
            e.policy.app_action(whatsapp),
            crate::config::Action::Monitor
        );
        assert!(name_verdict(&e, "resolver.example", 853).is_block());
        assert_eq!(name_verdict(&e, "resolver.example", 53), Verdict::Allow);
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn certificate_names_are_matched_like_an_sni() {
        let e = engine("");
        let cases: &[(&str, Option<&str>)] = &[
            ("web.whatsapp.com", Some("whatsapp")),
            ("whatsapp.net", Some("whatsapp")),
            // A wildcard name is covered by a suffix rule for all of it...
            ("*.whatsapp.net", Some("whatsapp")),
            ("*.mmg.whatsapp.net", Some("whatsapp")),
            ("*.teams.microsoft.com", Some("teams")),
            // ...but not by exact names under it: Azure Traffic Manager's
            // wildcard is not Teams because teams.trafficmanager.net is.
            ("*.trafficmanager.net", None),
            ("teams.trafficmanager.net", Some("teams")),
            ("www.example.org", None),
            ("*.example.org", None),
            ("*", None),
            ("", None),
        ];
        for (name, app) in cases {
            let list = names(&[name]);
            let found: Vec<_> = e.cert_evidence(&list).collect();
            assert_eq!(found.len(), 1);
            let got = found[0].map(|d| {
                assert_eq!(d.reason, Reason::Cert, "{name}");
                e.signatures.app_id(d.app)
            });
            assert_eq!(got, *app, "{name}");
        }
        // One item per name, in order; an IM name anywhere refuses.
        let list = names(&["www.example.org", "*.example.org", "*.whatsapp.net"]);
        let found: Vec<_> = e.cert_evidence(&list).collect();
        assert_eq!(found.len(), 3);
        assert!(found[0].is_none() && found[1].is_none() && found[2].is_some());
        let v = verdict(&e, e.cert_evidence(&list));
        assert_eq!(app_of(&e, v), Some(("whatsapp", Reason::Cert)));
        assert_eq!(Reason::Cert.as_str(), "cert");
    }

    #[test]
    fn certificate_names_on_the_allow_list() {
        let e = engine("[[policy.allow]]\nhosts = [\"*.whatsapp.net\", \"web.whatsapp.com\"]\n");
        let allowed = names(&["*.whatsapp.net", "mmg.whatsapp.net", "*.mmg.whatsapp.net"]);
        assert!(e.cert_evidence(&allowed).all(|d| d.is_none()));
        // An exact allowed name does not cover a wildcard over it.
        let list = names(&["web.whatsapp.com", "*.whatsapp.com"]);
        let found: Vec<_> = e.cert_evidence(&list).collect();
        assert!(found[0].is_none());
        assert!(found[1].is_some_and(|d| e.signatures.app_id(d.app) == "whatsapp"));
        // Nor does it cover its parent domain.
        let list = names(&["whatsapp.net"]);
        assert!(e.cert_evidence(&list).all(|d| d.is_some()));
    }
}
