//! `[tenant_restrictions]`: headers set on the vendors' sign-in requests
//! inside decrypted flows, so that a company's own Microsoft, Google,
//! Slack or Dropbox tenants sign in and consumer or foreign ones do not.
//! Each header replaces any value the client sent.
//!
//! Sources: Microsoft Entra tenant restrictions v1 and v2
//! (learn.microsoft.com/entra/identity/enterprise-apps/tenant-restrictions,
//! learn.microsoft.com/entra/external-id/tenant-restrictions-v2); Google
//! Workspace (support.google.com/a/answer/1668854); Slack
//! (slack.com/help/articles/360024821873); Dropbox network control
//! (help.dropbox.com/security/network-control).
use serde::Deserialize;

use super::tls_inspect::HostPattern;
use super::Validator;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    microsoft_tenants: Vec<String>,
    microsoft_context: String,
    microsoft_v2_policy: String,
    microsoft_block_consumer: bool,
    google_allowed_domains: Vec<String>,
    slack_requester: String,
    slack_allowed: Vec<String>,
    dropbox_team_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct PartialTenant {
    microsoft_tenants: Option<Vec<String>>,
    microsoft_context: Option<String>,
    microsoft_v2_policy: Option<String>,
    microsoft_block_consumer: Option<bool>,
    google_allowed_domains: Option<Vec<String>>,
    slack_requester: Option<String>,
    slack_allowed: Option<Vec<String>>,
    dropbox_team_ids: Option<Vec<String>>,
}

/// One vendor's headers on its sign-in hosts.
#[derive(Debug, Clone)]
pub struct TenantRule {
    /// The `vendor` label of `chatwall_tenant_headers_total`.
    pub vendor: &'static str,
    pub hosts: Vec<HostPattern>,
    /// Field names and values, set in this order, replacing the client's.
    pub fields: Vec<(&'static str, String)>,
}

/// The validated `[tenant_restrictions]`: the rules that apply (none when
/// nothing is configured).
#[derive(Debug, Clone, Default)]
pub struct TenantRestrictions {
    pub rules: Vec<TenantRule>,
}

impl TenantRestrictions {
    /// The rules for a (normalised) request host.
    pub fn for_host<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a TenantRule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.hosts.iter().any(|p| p.matches(host)))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn hosts(list: &[&str]) -> Vec<HostPattern> {
    list.iter().filter_map(|h| HostPattern::parse(h)).collect()
}

pub(super) fn validate(v: &mut Validator<'_>, raw: &RawTenant) -> TenantRestrictions {
    const S: &str = "tenant_restrictions";
    // A field value: visible ASCII and spaces, no line breaks (it goes
    // into a request head as written).
    let mut value = |key: &str, text: &str| -> String {
        let t = text.trim();
        if t.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            v.err(S, key, format!("`{text}` must be printable ASCII"));
            return String::new();
        }
        t.to_string()
    };
    let mut list = |key: &str, items: &[String]| -> String {
        let joined = items
            .iter()
            .map(|i| i.trim())
            .filter(|i| !i.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        value(key, &joined)
    };
    let ms_tenants = list("microsoft_tenants", &raw.microsoft_tenants);
    let google = list("google_allowed_domains", &raw.google_allowed_domains);
    let slack_allowed = list("slack_allowed", &raw.slack_allowed);
    let dropbox = list("dropbox_team_ids", &raw.dropbox_team_ids);
    let ms_context = value("microsoft_context", &raw.microsoft_context);
    let ms_v2 = value("microsoft_v2_policy", &raw.microsoft_v2_policy);
    let slack_requester = value("slack_requester", &raw.slack_requester);

    let mut rules = Vec::new();
    if !ms_v2.is_empty() {
        if !ms_v2.contains(':') {
            v.err(
                S,
                "microsoft_v2_policy",
                "must be TENANT_ID:POLICY_GUID (the id of the default cross-tenant access policy)",
            );
        }
        // v2 replaces v1 (and `restrict-msa`) on every sign-in host.
        rules.push(TenantRule {
            vendor: "microsoft",
            hosts: hosts(&[
                "login.live.com",
                "login.microsoft.com",
                "login.microsoftonline.com",
                "login.windows.net",
            ]),
            fields: vec![("sec-Restrict-Tenant-Access-Policy", ms_v2)],
        });
    } else {
        if !ms_tenants.is_empty() {
            if ms_context.is_empty() {
                v.err(
                    S,
                    "microsoft_context",
                    "Restrict-Access-Context (your directory ID) is needed with microsoft_tenants",
                );
            }
            rules.push(TenantRule {
                vendor: "microsoft",
                hosts: hosts(&[
                    "login.microsoftonline.com",
                    "login.microsoft.com",
                    "login.windows.net",
                ]),
                fields: vec![
                    ("Restrict-Access-To-Tenants", ms_tenants),
                    ("Restrict-Access-Context", ms_context),
                ],
            });
        }
        if raw.microsoft_block_consumer {
            rules.push(TenantRule {
                vendor: "microsoft",
                hosts: hosts(&["login.live.com"]),
                fields: vec![("sec-Restrict-Tenant-Access-Policy", "restrict-msa".into())],
            });
        }
    }
    if !google.is_empty() {
        rules.push(TenantRule {
            vendor: "google",
            hosts: hosts(&["*.google.com"]),
            fields: vec![("X-GoogApps-Allowed-Domains", google)],
        });
    }
    if !slack_allowed.is_empty() || !slack_requester.is_empty() {
        if slack_allowed.is_empty() || slack_requester.is_empty() {
            v.err(
                S,
                "slack_requester",
                "slack_requester and slack_allowed go together",
            );
        }
        rules.push(TenantRule {
            vendor: "slack",
            hosts: hosts(&["*.slack.com"]),
            fields: vec![
                ("X-Slack-Allowed-Workspaces-Requester", slack_requester),
                ("X-Slack-Allowed-Workspaces", slack_allowed),
            ],
        });
    }
    if !dropbox.is_empty() {
        rules.push(TenantRule {
            vendor: "dropbox",
            hosts: hosts(&["*.dropbox.com", "*.dropboxapi.com"]),
            fields: vec![("X-Dropbox-allowed-Team-Ids", dropbox)],
        });
    }
    TenantRestrictions { rules }
}

/// A request head with `fields` set: every field of the same names the
/// client sent is dropped, the new ones go last; the request line and every
/// other field stay as written (case, order, line ends). `head` is a whole
/// head that parsed, blank line included.
pub fn set_fields(head: &[u8], fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 128);
    // Empty lines before the request line (RFC 9112 §2.2 lets servers
    // skip them, as httparse does) are dropped.
    let mut lines = head
        .split_inclusive(|&b| b == b'\n')
        .skip_while(|l| l.iter().all(|&b| b == b'\r' || b == b'\n'));
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
    }
    for line in lines {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
        if bare.is_empty() {
            break;
        }
        let name = bare.split(|&b| b == b':').next().unwrap_or_default();
        let ours = fields
            .iter()
            .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name));
        if !ours {
            out.extend_from_slice(line);
        }
    }
    for (n, v) in fields {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_lines_before_the_request_line_are_dropped() {
        let head = b"\r\n\r\n\nPOST /x HTTP/1.1\r\nHost: login.microsoftonline.com\r\nContent-Length: 0\r\n\r\n";
        let out = set_fields(head, &[("Restrict-Access-Context", "id")]);
        assert_eq!(
            out,
            b"POST /x HTTP/1.1\r\nHost: login.microsoftonline.com\r\nContent-Length: 0\r\nRestrict-Access-Context: id\r\n\r\n"
        );
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
        assert_eq!(req.path, Some("/x"));
    }

    #[test]
    fn fields_are_replaced_and_everything_else_kept() {
        let head = b"GET /common/oauth2 HTTP/1.1\r\nHost: login.microsoftonline.com\r\nrestrict-access-to-tenants: evil.example\r\nX-Keep:  a \r\n\r\n";
        let out = set_fields(
            head,
            &[
                ("Restrict-Access-To-Tenants", "contoso.com"),
                ("Restrict-Access-Context", "id"),
            ],
        );
        assert_eq!(
            out,
            b"GET /common/oauth2 HTTP/1.1\r\nHost: login.microsoftonline.com\r\nX-Keep:  a \r\nRestrict-Access-To-Tenants: contoso.com\r\nRestrict-Access-Context: id\r\n\r\n"
        );
    }
}
