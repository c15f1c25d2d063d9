//! `echo` version 2: the same contract as version 1 with a new greeting, and a state format
//! of its own that it migrates from version 1's.
//!
//! Reply data: `{"version": "2.x.y", "greeting": "...", "count": N, "echo": "<payload>"}`.
//! State: `{"format": 2, "requests": N}`; version 1's `{"count": N}` is migrated on import.

use plugin_api::{export_service, info, serde_json, BoxError, Host, Reply, Request, Service};

struct Echo {
    requests: u64,
}

impl Service for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Echo { requests: 0 })
    }

    fn start(&mut self) -> Result<(), BoxError> {
        info!(
            "echo {} ready, {} requests so far",
            Self::VERSION,
            self.requests
        );
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
        self.requests += 1;
        Ok(Reply::json(&serde_json::json!({
            "version": Self::VERSION,
            "greeting": "hello from echo v2",
            "count": self.requests,
            "echo": String::from_utf8_lossy(&request.payload),
        })))
    }

    fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(
            &serde_json::json!({ "format": 2, "requests": self.requests }),
        )?)
    }

    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), BoxError> {
        let state: serde_json::Value = serde_json::from_slice(state)?;
        let field = match from_version.split('.').next() {
            Some("1") => "count",
            Some("2") => "requests",
            _ => {
                return Err(format!(
                    "echo {} cannot read state of version {from_version}",
                    Self::VERSION
                )
                .into())
            }
        };
        self.requests = state[field]
            .as_u64()
            .ok_or_else(|| format!("state of version {from_version} has no numeric `{field}`"))?;
        if field == "count" {
            info!(
                "migrated version {from_version}'s count ({}) to format 2",
                self.requests
            );
        }
        Ok(())
    }
}

export_service!(Echo);
