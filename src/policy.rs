//! `Detection` + client + configuration → `Verdict`. Pure: the moment a
//! flow is decided at comes with its [`Who`].
//!
//! Order: the allow-list of destinations (names and prefixes) is checked
//! before any block; then, for a detection, the first client exception that
//! names the app or its category (and whose schedule, if it has one, holds
//! at that moment), then the per-app override, the per-category override
//! and the default. Generic findings (not TLS on 443, not HTTP on 80, ECH)
//! take their own knobs. A verdict an exception made carries its index in
//! [`Detection::exception`].
use std::net::IpAddr;
use std::sync::OnceLock;

use jiff::Timestamp;

use crate::classify::host::{normalize_host, pattern_matches};
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::{Action, PolicyConfig};
use crate::signatures::SignatureSet;

/// Who a flow is for: the client address and, with proxy authentication,
/// the user name; and when it is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub ip: IpAddr,
    pub user: Option<std::sync::Arc<str>>,
    /// The user's directory groups as [`crate::config::group_key`] writes
    /// them (names and DNs), read before the flow is decided; `None`: not
    /// read (no exception names groups, or no user).
    pub groups: Option<std::sync::Arc<[String]>>,
    /// The moment of the decision: given ([`Who::at`]), or read from the
    /// clock the first time an exception with a schedule needs it, once
    /// for this `Who` (a flow's decisions share one reading), and never
    /// when no exception that matches has a schedule.
    at: OnceLock<Timestamp>,
}

impl Who {
    pub fn ip(ip: IpAddr) -> Who {
        Who::new(ip, None)
    }

    pub fn new(ip: IpAddr, user: Option<std::sync::Arc<str>>) -> Who {
        Who {
            ip,
            user,
            groups: None,
            at: OnceLock::new(),
        }
    }

    /// The user is a member of these groups ([`crate::config::group_key`]).
    pub fn with_groups(self, groups: Option<std::sync::Arc<[String]>>) -> Who {
        Who { groups, ..self }
    }

    /// Decided at this moment instead of now.
    pub fn at(self, moment: Timestamp) -> Who {
        Who {
            at: OnceLock::from(moment),
            ..self
        }
    }

    /// The moment of the decision (the clock, read once).
    pub fn moment(&self) -> Timestamp {
        *self.at.get_or_init(Timestamp::now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Passes, but is logged and counted as a block would be.
    Monitor(Detection),
    Block(Detection),
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Monitor(_) => "monitor",
            Verdict::Block(_) => "block",
        }
    }

    pub fn detection(&self) -> Option<&Detection> {
        match self {
            Verdict::Allow => None,
            Verdict::Monitor(d) | Verdict::Block(d) => Some(d),
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self, Verdict::Block(_))
    }
}

/// A policy entry that does not fit the signature set: where, and why.
#[derive(Debug, Clone)]
pub struct PolicyError {
    pub section: &'static str,
    pub key: String,
    pub message: String,
}

struct Exception {
    clients: crate::classify::NetSet,
    users: Vec<String>,
    groups: Vec<String>,
    apps: Vec<bool>,
    action: Action,
    schedule: Option<crate::schedule::Schedule>,
}

pub struct Policy {
    cfg: PolicyConfig,
    /// Action per app index, without exceptions.
    actions: Vec<Action>,
    exceptions: Vec<Exception>,
}

impl Policy {
    /// Resolve the configuration against the signature set. Unknown app ids
    /// or categories are errors: a typo must not silently allow nothing.
    pub fn new(cfg: &PolicyConfig, set: &SignatureSet) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut err = |section: &'static str, key: &str, message: String| {
            errors.push(PolicyError {
                section,
                key: key.to_string(),
                message,
            })
        };
        for app in cfg.apps.keys() {
            if set.app_index(app).is_none() {
                err(
                    "policy.apps",
                    app,
                    format!("`{app}` is not an app of the signature set"),
                );
            }
        }
        // A category the set has, or one any set may have (the built-in
        // media-relay default must not fail against a directory of
        // signatures without such an app); a misspelt one is an error.
        let known_category = |c: &str| {
            crate::signatures::load::CATEGORIES.contains(&c)
                || set.apps().iter().any(|a| a.category == c)
        };
        for c in cfg.categories.keys() {
            if !known_category(c) {
                err(
                    "policy.categories",
                    c,
                    format!("`{c}` is not a category of the signature set"),
                );
            }
        }
        let actions = set
            .apps()
            .iter()
            .map(|a| {
                cfg.apps
                    .get(&a.id)
                    .or_else(|| cfg.categories.get(&a.category))
                    .copied()
                    .unwrap_or(cfg.default)
            })
            .collect();
        let mut exceptions = Vec::new();
        for e in &cfg.exceptions {
            for app in &e.apps {
                if set.app_index(app).is_none() {
                    err(
                        "policy.exceptions",
                        "apps",
                        format!("`{app}` is not an app of the signature set"),
                    );
                }
            }
            for c in &e.categories {
                if !known_category(c) {
                    err(
                        "policy.exceptions",
                        "categories",
                        format!("`{c}` is not a category of the signature set"),
                    );
                }
            }
            exceptions.push(Exception {
                clients: e.clients.clone(),
                users: e.users.clone(),
                groups: e.groups.clone(),
                apps: set
                    .apps()
                    .iter()
                    .map(|a| e.apps.contains(&a.id) || e.categories.contains(&a.category))
                    .collect(),
                action: e.action,
                schedule: e.schedule.clone(),
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            cfg: cfg.clone(),
            actions,
            exceptions,
        })
    }

    /// Is this destination name on the allow-list?
    pub fn allows_name(&self, name: &str) -> bool {
        if self.cfg.allow_hosts.is_empty() {
            return false;
        }
        match normalize_host(name) {
            Some(n) => self.cfg.allow_hosts.iter().any(|p| pattern_matches(p, &n)),
            None => false,
        }
    }

    /// Is every name under `suffix` (one label deeper or more) on the
    /// allow-list? That is what a wildcard certificate name `*.suffix`
    /// stands for: only a `*.s` pattern covering the whole of it counts, not
    /// an exact name that happens to be under it.
    pub fn allows_every_name_under(&self, suffix: &str) -> bool {
        if self.cfg.allow_hosts.is_empty() {
            return false;
        }
        let Some(suffix) = normalize_host(suffix) else {
            return false;
        };
        self.cfg.allow_hosts.iter().any(|p| {
            p.strip_prefix("*.")
                .is_some_and(|s| s == suffix || pattern_matches(p, &suffix))
        })
    }

    /// Is this destination address on the allow-list?
    pub fn allows_addr(&self, addr: IpAddr) -> bool {
        self.cfg.allow_nets.contains(addr)
    }

    /// The action for a detection from this client, now.
    pub fn action(&self, client: IpAddr, d: &Detection) -> Action {
        self.resolve(&Who::ip(client), d).0
    }

    /// The action for a detection for `who` at its moment, and the index
    /// of the exception that chose it (none: the overrides or the default).
    pub fn resolve(&self, who: &Who, d: &Detection) -> (Action, Option<usize>) {
        match d.reason {
            Reason::NonTls => return (self.cfg.non_tls_on_443, None),
            Reason::NonHttp => return (self.cfg.non_http_on_80, None),
            Reason::Ech => return (self.cfg.ech, None),
            _ => {}
        }
        if d.app == UNIDENTIFIED {
            return (self.cfg.default, None);
        }
        let i = d.app as usize;
        let user = who.user.as_deref();
        for (n, e) in self.exceptions.iter().enumerate() {
            if e.apps.get(i).copied().unwrap_or(false)
                && (e.clients.is_empty() || e.clients.contains(who.ip))
                && (e.users.is_empty() || user.is_some_and(|u| e.users.iter().any(|x| x == u)))
                && (e.groups.is_empty() || matched_group(&e.groups, who).is_some())
                && e.schedule.as_ref().map_or(true, |s| s.holds(who.moment()))
            {
                return (e.action, Some(n));
            }
        }
        (
            self.actions.get(i).copied().unwrap_or(self.cfg.default),
            None,
        )
    }

    pub fn decide(&self, client: IpAddr, d: Option<Detection>) -> Verdict {
        self.decide_for(&Who::ip(client), d)
    }

    pub fn decide_for(&self, who: &Who, d: Option<Detection>) -> Verdict {
        match d {
            None => Verdict::Allow,
            Some(d) => {
                let (action, exception) = self.resolve(who, &d);
                let d = Detection {
                    exception: exception.and_then(|n| u16::try_from(n).ok()),
                    ..d
                };
                match action {
                    Action::Allow => Verdict::Allow,
                    Action::Monitor => Verdict::Monitor(d),
                    Action::Block => Verdict::Block(d),
                }
            }
        }
    }

    /// Does any exception name directory groups? Only then are a user's
    /// groups read.
    pub fn needs_groups(&self) -> bool {
        self.exceptions.iter().any(|e| !e.groups.is_empty())
    }

    /// The group (as the exception writes it) through which `who` matched
    /// the exception at `index`, if it names groups.
    pub fn exception_group(&self, index: usize, who_groups: Option<&[String]>) -> Option<&str> {
        let e = self.exceptions.get(index)?;
        let groups = who_groups?;
        let n = e.groups.iter().position(|g| groups.contains(g))?;
        self.cfg
            .exceptions
            .get(index)
            .and_then(|c| c.groups.get(n))
            .map(String::as_str)
    }

    /// How logs and metrics name the exception at `index`.
    pub fn exception_label(&self, index: usize) -> Option<&str> {
        self.cfg.exceptions.get(index).map(|e| e.label.as_str())
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The resolved action of an app for clients no exception names.
    pub fn app_action(&self, app: usize) -> Action {
        self.actions.get(app).copied().unwrap_or(self.cfg.default)
    }
}

/// The first of `wanted` among the groups of `who`.
fn matched_group<'a>(wanted: &'a [String], who: &Who) -> Option<&'a str> {
    let groups = who.groups.as_deref()?;
    wanted
        .iter()
        .find(|g| groups.contains(g))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Engine;

    fn engine(config: &str) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, config).expect("write config");
        Engine::build(Config::load(Some(&path)).expect("config")).expect("engine")
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn slack(e: &Engine) -> Detection {
        e.signatures.classify_host("app.slack.com").expect("slack")
    }

    const LUNCH: &str = r#"
[[policy.exceptions]]
name = "lunch"
clients = ["10.1.0.0/16"]
apps = ["slack"]
action = "allow"
schedule = ["Mon-Fri 12:00-13:00", "Sat-Sun"]
timezone = "Europe/Berlin"

[[policy.exceptions]]
clients = ["10.1.0.0/16"]
apps = ["slack"]
action = "monitor"
"#;

    #[test]
    fn a_scheduled_exception_applies_inside_its_window_only() {
        let e = engine(LUNCH);
        let d = slack(&e);
        let client: IpAddr = "10.1.2.3".parse().expect("ip");
        // Monday 2 June 2025, 12:30 in Berlin (CEST).
        let inside = Who::ip(client).at(at("2025-06-02T10:30:00Z"));
        assert_eq!(e.policy.resolve(&inside, &d), (Action::Allow, Some(0)));
        assert_eq!(e.policy.decide_for(&inside, Some(d)), Verdict::Allow);
        // 13:30: the next exception decides, and says so.
        let outside = Who::ip(client).at(at("2025-06-02T11:30:00Z"));
        assert_eq!(e.policy.resolve(&outside, &d), (Action::Monitor, Some(1)));
        match e.policy.decide_for(&outside, Some(d)) {
            Verdict::Monitor(m) => assert_eq!(m.exception, Some(1)),
            v => panic!("{v:?}"),
        }
        assert_eq!(e.policy.exception_label(0), Some("lunch"));
        assert_eq!(e.policy.exception_label(1), Some("#2"));
        assert_eq!(e.policy.exception_label(2), None);
        // Saturday, any hour.
        let weekend = Who::ip(client).at(at("2025-06-07T03:00:00Z"));
        assert_eq!(e.policy.resolve(&weekend, &d).0, Action::Allow);
        // Another client: no exception, the default blocks.
        let other = Who::ip("10.2.0.1".parse().expect("ip")).at(at("2025-06-02T10:30:00Z"));
        assert_eq!(e.policy.resolve(&other, &d), (Action::Block, None));
        match e.policy.decide_for(&other, Some(d)) {
            Verdict::Block(b) => assert_eq!(b.exception, None),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_scheduled_exception_blocks_outside_its_window() {
        let e = engine(
            "[policy]\ndefault = \"allow\"\n[[policy.exceptions]]\nname = \"school-hours\"\napps = [\"slack\"]\naction = \"block\"\nschedule = [\"Mon-Fri 08:00-16:00\"]\ntimezone = \"UTC\"\n",
        );
        let d = slack(&e);
        let who = |t: &str| Who::ip("192.0.2.1".parse().expect("ip")).at(at(t));
        match e.policy.decide_for(&who("2025-06-03T09:00:00Z"), Some(d)) {
            Verdict::Block(b) => assert_eq!(b.exception, Some(0)),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            e.policy.decide_for(&who("2025-06-03T17:00:00Z"), Some(d)),
            Verdict::Allow
        );
    }

    #[test]
    fn the_clock_is_read_once_per_who_and_only_for_a_schedule() {
        let e = engine(LUNCH);
        let d = slack(&e);
        // No exception matches this client: the clock is never read.
        let who = Who::ip("192.0.2.1".parse().expect("ip"));
        let _ = e.policy.decide_for(&who, Some(d));
        assert!(who.at.get().is_none());
        // One that does: read once, then kept for every later decision.
        let who = Who::ip("10.1.2.3".parse().expect("ip"));
        let _ = e.policy.decide_for(&who, Some(d));
        let first = *who.at.get().expect("read");
        let _ = e.policy.decide_for(&who, Some(d));
        assert_eq!(who.moment(), first);
        // A Who built at a moment never reads the clock.
        let fixed = at("2001-02-03T04:05:06Z");
        assert_eq!(Who::ip(who.ip).at(fixed).moment(), fixed);
    }

    #[test]
    fn group_exceptions_match_members_of_any_listed_group() {
        let e = engine(
            "[[policy.exceptions]]\nname = \"sales-im\"\ngroups = [\"Sales\", \"cn=Ops,ou=groups,dc=x\"]\nclients = [\"10.0.0.0/8\"]\napps = [\"slack\"]\naction = \"allow\"\n[ldap]\nurl = \"ldap://127.0.0.1:9\"\nbase_dn = \"dc=x\"\n",
        );
        assert!(e.policy.needs_groups());
        let d = slack(&e);
        let who = |ip: &str, groups: &[&str]| {
            let g: Vec<String> = groups
                .iter()
                .filter_map(|g| crate::config::group_key(g))
                .collect();
            Who::new(ip.parse().expect("ip"), Some("alice".into())).with_groups(Some(g.into()))
        };
        let sales = who("10.0.0.1", &["support", "sales"]);
        assert_eq!(e.policy.resolve(&sales, &d), (Action::Allow, Some(0)));
        assert_eq!(
            e.policy.exception_group(0, sales.groups.as_deref()),
            Some("sales")
        );
        let ops = who("10.0.0.1", &["CN=Ops, OU=Groups, DC=x"]);
        assert_eq!(e.policy.resolve(&ops, &d), (Action::Allow, Some(0)));
        assert_eq!(
            e.policy.exception_group(0, ops.groups.as_deref()),
            Some("cn=ops,ou=groups,dc=x")
        );
        // Every field must hold: the client prefix too.
        assert_eq!(
            e.policy.resolve(&who("192.0.2.1", &["sales"]), &d).0,
            Action::Block
        );
        // No group, groups not read, or other groups: no exception.
        assert_eq!(e.policy.resolve(&who("10.0.0.1", &[]), &d).0, Action::Block);
        assert_eq!(
            e.policy.resolve(&who("10.0.0.1", &["salesx"]), &d).0,
            Action::Block
        );
        let unread = Who::new("10.0.0.1".parse().expect("ip"), Some("alice".into()));
        assert_eq!(e.policy.resolve(&unread, &d).0, Action::Block);
        assert!(!engine("").policy.needs_groups());
    }

    #[test]
    fn exceptions_without_schedule_or_name_keep_working() {
        let e = engine(
            "[[policy.exceptions]]\nclients = [\"10.0.0.0/8\"]\nusers = [\"alice\"]\napps = [\"slack\"]\naction = \"allow\"\n",
        );
        let d = slack(&e);
        let alice = Who::new("10.0.0.1".parse().expect("ip"), Some("alice".into()));
        assert_eq!(e.policy.resolve(&alice, &d), (Action::Allow, Some(0)));
        assert!(alice.at.get().is_none(), "no schedule, no clock");
        let bob = Who::new("10.0.0.1".parse().expect("ip"), Some("bob".into()));
        assert_eq!(e.policy.resolve(&bob, &d), (Action::Block, None));
    }
}
