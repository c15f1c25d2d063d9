//! `echo` version 1: replies with what it was sent and how many requests it has handled.
//!
//! Reply data: `{"version": "1.x.y", "greeting": "...", "count": N, "echo": "<payload>"}`.
//! State: `{"count": N}`.

use plugin_api::{export_service, info, serde_json, BoxError, Host, Reply, Request, Service};

struct Echo {
    count: u64,
}

impl Service for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Echo { count: 0 })
    }

    fn start(&mut self) -> Result<(), BoxError> {
        info!(
            "echo {} ready, {} requests so far",
            Self::VERSION,
            self.count
        );
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
        self.count += 1;
        Ok(Reply::json(&serde_json::json!({
            "version": Self::VERSION,
            "greeting": "hello",
            "count": self.count,
            "echo": String::from_utf8_lossy(&request.payload),
        })))
    }

    fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(
            &serde_json::json!({ "count": self.count }),
        )?)
    }

    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), BoxError> {
        if !from_version.starts_with("1.") {
            return Err(format!(
                "echo {} cannot read state of version {from_version}",
                Self::VERSION
            )
            .into());
        }
        let state: serde_json::Value = serde_json::from_slice(state)?;
        self.count = state["count"]
            .as_u64()
            .ok_or("state has no numeric `count`")?;
        Ok(())
    }
}

export_service!(Echo);
