//! The proxy auto-config file (`/proxy.pac`, `/wpad.dat`) generated from the
//! configuration: direct for configured internal networks and names and for
//! plain host names, the proxy for everything else. `pac.proxy` may list two
//! proxies (`a:3128; b:3128`) for failover.
use crate::config::Config;

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
