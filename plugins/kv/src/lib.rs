//! `kv`: a key-value store. Its state is its whole map.
//!
//! Requests (payload JSON, any request kind):
//! - `{"op": "put", "key": K, "value": V}` → `{"previous": V | null}`
//! - `{"op": "get", "key": K}` → `{"value": V}`, or code 404 when the key is absent
//! - `{"op": "delete", "key": K}` → `{"previous": V | null}`
//! - `{"op": "len"}` → `{"len": N}`
//!
//! Values are any JSON value. State: the map as a JSON object.

use std::collections::BTreeMap;

use plugin_api::{
    codes, export_service,
    serde_json::{self, Value},
    BoxError, Host, Reply, Request, Service,
};

struct Kv {
    map: BTreeMap<String, Value>,
}

fn key(request: &Value) -> Result<&str, BoxError> {
    request["key"]
        .as_str()
        .ok_or_else(|| "request has no string `key`".into())
}

impl Service for Kv {
    const NAME: &'static str = "kv";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
        Ok(Kv {
            map: BTreeMap::new(),
        })
    }

    fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
        // A payload that is not JSON is the client's fault: answered 400.
        let body: Value = request.json()?;
        let reply = match body["op"].as_str() {
            Some("put") => {
                let value = body.get("value").cloned().unwrap_or(Value::Null);
                let previous = self.map.insert(key(&body)?.to_owned(), value);
                Reply::json(&serde_json::json!({ "previous": previous }))
            }
            Some("get") => match self.map.get(key(&body)?) {
                Some(value) => Reply::json(&serde_json::json!({ "value": value })),
                None => Reply::error(codes::NOT_FOUND, format!("no key `{}`", key(&body)?)),
            },
            Some("delete") => {
                let previous = self.map.remove(key(&body)?);
                Reply::json(&serde_json::json!({ "previous": previous }))
            }
            Some("len") => Reply::json(&serde_json::json!({ "len": self.map.len() })),
            Some(other) => Reply::error(
                codes::BAD_REQUEST,
                format!("unknown op `{other}`; expected put, get, delete or len"),
            ),
            None => Reply::error(
                codes::BAD_REQUEST,
                "request has no string `op`; expected put, get, delete or len",
            ),
        };
        Ok(reply)
    }

    fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(&self.map)?)
    }

    fn import_state(&mut self, _from_version: &str, state: &[u8]) -> Result<(), BoxError> {
        self.map = serde_json::from_slice(state)?;
        Ok(())
    }
}

export_service!(Kv);
