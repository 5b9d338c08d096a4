//! `Detection` + client + configuration → `Verdict`. Pure.
//!
//! Order: the allow-list of destinations (names and prefixes) is checked
//! before any block; then, for a detection, the first client exception that
//! names the app or its category, then the per-app override, the
//! per-category override and the default. Generic findings (not TLS on 443,
//! not HTTP on 80, ECH) take their own knobs.
use std::net::IpAddr;

use crate::classify::host::{normalize_host, pattern_matches};
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::{Action, PolicyConfig};
use crate::signatures::SignatureSet;

/// Who a flow is for: the client address and, with proxy authentication,
/// the user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub ip: IpAddr,
    pub user: Option<std::sync::Arc<str>>,
}

impl Who {
    pub fn ip(ip: IpAddr) -> Who {
        Who { ip, user: None }
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
    apps: Vec<bool>,
    action: Action,
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
                apps: set
                    .apps()
                    .iter()
                    .map(|a| e.apps.contains(&a.id) || e.categories.contains(&a.category))
                    .collect(),
                action: e.action,
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

    /// The action for a detection from this client.
    pub fn action(&self, client: IpAddr, d: &Detection) -> Action {
        self.action_for(client, None, d)
    }

    /// The action for a detection from this client and user.
    pub fn action_for(&self, client: IpAddr, user: Option<&str>, d: &Detection) -> Action {
        match d.reason {
            Reason::NonTls => return self.cfg.non_tls_on_443,
            Reason::NonHttp => return self.cfg.non_http_on_80,
            Reason::Ech => return self.cfg.ech,
            _ => {}
        }
        if d.app == UNIDENTIFIED {
            return self.cfg.default;
        }
        let i = d.app as usize;
        for e in &self.exceptions {
            if e.apps.get(i).copied().unwrap_or(false)
                && (e.clients.is_empty() || e.clients.contains(client))
                && (e.users.is_empty() || user.is_some_and(|u| e.users.iter().any(|x| x == u)))
            {
                return e.action;
            }
        }
        self.actions.get(i).copied().unwrap_or(self.cfg.default)
    }

    pub fn decide(&self, client: IpAddr, d: Option<Detection>) -> Verdict {
        self.decide_for(&Who::ip(client), d)
    }

    pub fn decide_for(&self, who: &Who, d: Option<Detection>) -> Verdict {
        match d {
            None => Verdict::Allow,
            Some(d) => match self.action_for(who.ip, who.user.as_deref(), &d) {
                Action::Allow => Verdict::Allow,
                Action::Monitor => Verdict::Monitor(d),
                Action::Block => Verdict::Block(d),
            },
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The resolved action of an app for clients no exception names.
    pub fn app_action(&self, app: usize) -> Action {
        self.actions.get(app).copied().unwrap_or(self.cfg.default)
    }
}
