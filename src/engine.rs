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

static GENERATION: AtomicU64 = AtomicU64::new(0);

pub struct Engine {
    pub config: Arc<Config>,
    pub signatures: SignatureSet,
    pub policy: Policy,
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
        Ok(Engine {
            config: Arc::new(config),
            signatures,
            policy,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
        })
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
    /// the allow-list), and ECH or legacy ESNI.
    pub fn hello_evidence(&self, hello: &ClientHello) -> [Option<Detection>; 2] {
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
        });
        [named, ech]
    }
}
