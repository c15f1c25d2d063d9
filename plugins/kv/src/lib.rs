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
    BadRequest, BoxError, Host, Reply, Request, Service,
};

struct Kv {
    map: BTreeMap<String, Value>,
}

fn key(request: &Value) -> Result<&str, BoxError> {
    request["key"]
        .as_str()
        .ok_or_else(|| BadRequest("request has no string `key`".into()).into())
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

#[cfg(test)]
mod tests {
    use plugin_api::{codes, testing::Harness};

    use super::Kv;

    #[test]
    fn it_stores_and_answers_and_its_state_is_the_map() {
        let mut kv = Harness::<Kv>::new(None).unwrap();
        kv.start().unwrap();
        let put = kv.request("put", r#"{"op":"put","key":"a","value":[1,2]}"#);
        assert!(put.is_ok(), "{}", put.message);
        let get = kv.request("get", r#"{"op":"get","key":"a"}"#);
        assert_eq!(get.data, br#"{"value":[1,2]}"#);
        assert_eq!(
            kv.request("get", r#"{"op":"get","key":"b"}"#).code,
            codes::NOT_FOUND
        );

        // The same map exports the same bytes: a checkpoint of it writes nothing.
        let state = kv.export_state().unwrap();
        assert_eq!(state, kv.export_state().unwrap());
        let mut again = Harness::<Kv>::new(None).unwrap();
        again.import_state("1.0.0", &state).unwrap();
        assert_eq!(
            again.request("len", r#"{"op":"len"}"#).data,
            br#"{"len":1}"#
        );
    }

    #[test]
    fn a_bad_request_is_answered_400_in_words() {
        let mut kv = Harness::<Kv>::new(None).unwrap();
        for (payload, said) in [
            ("not json", "is not the expected JSON"),
            (r#"{"op":"nope"}"#, "unknown op `nope`"),
            (r#"{"op":"get"}"#, "no string `key`"),
        ] {
            let reply = kv.request("x", payload);
            assert_eq!(
                reply.code,
                codes::BAD_REQUEST,
                "{payload}: {}",
                reply.message
            );
            assert!(reply.message.contains(said), "{}", reply.message);
        }
    }
}
