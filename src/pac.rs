//! The proxy auto-config file (`/proxy.pac`, `/wpad.dat`) generated from the
//! configuration: direct for configured internal networks and names and for
//! plain host names, the proxy for everything else. `pac.proxy` may list two
//! proxies (`a:3128; b:3128`) for failover.
//!
//! Served on the admin listener and, so that clients need no access to the
//! admin port, on the explicit proxy listeners as an origin-form `GET` or
//! `HEAD` of either path, without proxy credentials (browsers fetch it
//! before they have any).
use http::{header, HeaderValue, Method, Request, Response};

use crate::config::Config;
use crate::proxy::refuse::{full, ProxyBody};

pub const CONTENT_TYPE: &str = "application/x-ns-proxy-autoconfig";

/// Is this a request for the PAC file (`GET` or `HEAD` of `/proxy.pac` or
/// `/wpad.dat`; any query)?
pub fn is_pac_request(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD) && matches!(path, "/proxy.pac" | "/wpad.dat")
}

/// The PAC file as a response.
pub fn response(cfg: &Config) -> Response<ProxyBody> {
    let mut r = Response::new(full(render(cfg)));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r
}

/// The PAC file for an origin-form request for it on a proxy listener;
/// `None` for anything else (an absolute-form `GET
/// http://host/proxy.pac` is a proxy request like any other).
pub fn origin_form<B>(cfg: &Config, req: &Request<B>) -> Option<Response<ProxyBody>> {
    let uri = req.uri();
    (uri.scheme().is_none()
        && uri.authority().is_none()
        && is_pac_request(req.method(), uri.path()))
    .then(|| response(cfg))
}

pub fn render(cfg: &Config) -> String {
    let proxies = if cfg.pac.proxy.trim().is_empty() {
        cfg.listen
            .explicit
            .first()
            .map(|a| format!("PROXY {a}"))
            .unwrap_or_else(|| "DIRECT".into())
    } else {
        cfg.pac
            .proxy
            .split([';', ','])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| format!("PROXY {p}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut out = String::from("function FindProxyForURL(url, host) {\n");
    out.push_str("  if (isPlainHostName(host)) return \"DIRECT\";\n");
    for d in &cfg.pac.direct_domains {
        out.push_str(&format!(
            "  if (host == \"{d}\" || dnsDomainIs(host, \".{d}\")) return \"DIRECT\";\n"
        ));
    }
    for n in &cfg.pac.direct_networks {
        if let ipnet::IpNet::V4(v4) = n {
            out.push_str(&format!(
                "  if (isInNet(host, \"{}\", \"{}\")) return \"DIRECT\";\n",
                v4.network(),
                v4.netmask()
            ));
        }
    }
    out.push_str(&format!("  return \"{proxies}\";\n}}\n"));
    out
}
