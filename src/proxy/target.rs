//! The CONNECT port rule (`[access] connect_ports`). Pure: the tunnel
//! calls it before any lookup or connection, so a CONNECT it refuses never
//! reaches DNS or an upstream.
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::PortSet;

use super::refuse::FlowError;

/// The port of a CONNECT target (authority-form, RFC 9112 §3.2.3:
/// `host:port`, the port required).
pub fn connect_port(authority: &http::uri::Authority) -> Result<u16, FlowError> {
    authority
        .port_u16()
        .filter(|&p| p != 0)
        .ok_or(FlowError::BadRequest(
            "CONNECT needs an explicit, non-zero port",
        ))
}

/// May a CONNECT reach `port` (`[access] connect_ports`)? A refusal is
/// counted and logged as app `unidentified`, reason `port`: the proxy's own
/// access rule refused it, not a signature.
pub fn check_connect_port(allowed: &PortSet, port: u16) -> Result<(), FlowError> {
    if allowed.contains(port) {
        Ok(())
    } else {
        Err(FlowError::PortNotAllowed(port))
    }
}

/// How a `connect_ports` refusal is counted and logged.
pub fn port_refusal() -> Detection {
    Detection {
        app: UNIDENTIFIED,
        rule: None,
        reason: Reason::Port,
        offset: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_ports_refuse_what_they_do_not_list() {
        let only_443 = PortSet::from_ranges(vec![(443, 443)]);
        assert!(check_connect_port(&only_443, 443).is_ok());
        for p in [1, 80, 442, 444, 5222, 8443, 65535] {
            assert!(matches!(
                check_connect_port(&only_443, p),
                Err(FlowError::PortNotAllowed(q)) if q == p
            ));
        }
    }
}
