//! One snapshot of configuration, signature set and policy, built together.
//! A flow takes the snapshot once at its start; a reload builds a complete
//! new one and swaps it whole, so no verdict changes mid-flow.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
