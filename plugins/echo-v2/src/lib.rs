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
        let field = match plugin_api::semver::Version::parse(from_version)?.major {
            1 => "count",
            2 => "requests",
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

#[cfg(test)]
mod tests {
    use plugin_api::{
        serde_json::{self, json, Value},
        testing::Harness,
    };

    use super::Echo;

    fn reply(echo: &mut Harness<Echo>, payload: &str) -> Value {
        serde_json::from_slice(&echo.request("echo", payload).data).unwrap()
    }

    #[test]
    fn version_1s_count_is_migrated_and_counting_goes_on() {
        let mut echo = Harness::<Echo>::new(None).unwrap();
        echo.import_state("1.0.0", br#"{"count": 41}"#).unwrap();
        echo.start().unwrap();
        assert_eq!(reply(&mut echo, "hi")["count"], 42);
        let exported: Value = serde_json::from_slice(&echo.export_state().unwrap()).unwrap();
        assert_eq!(exported, json!({"format": 2, "requests": 42}));
        assert!(
            echo.logs()
                .iter()
                .any(|l| l.message == "migrated version 1.0.0's count (41) to format 2"),
            "{:?}",
            echo.logs()
        );
    }

    #[test]
    fn its_own_state_comes_back_as_it_left() {
        let mut old = Harness::<Echo>::new(None).unwrap();
        old.start().unwrap();
        reply(&mut old, "a");
        let state = old.export_state().unwrap();
        let mut new = Harness::<Echo>::new(None).unwrap();
        new.import_state("2.0.0", &state).unwrap();
        assert_eq!(reply(&mut new, "b")["count"], 2);
    }

    #[test]
    fn a_state_it_cannot_read_is_refused() {
        let mut echo = Harness::<Echo>::new(None).unwrap();
        let newer = echo
            .import_state("3.1.0", br#"{"requests": 1}"#)
            .unwrap_err();
        assert!(
            newer.contains("cannot read state of version 3.1.0"),
            "{newer}"
        );
        let garbled = echo.import_state("1.0.0", b"{").unwrap_err();
        assert!(garbled.contains("EOF"), "{garbled}");
        let not_semver = echo.import_state("one", br#"{"count": 1}"#).unwrap_err();
        assert!(!not_semver.is_empty());
    }
}
