//! Property tests of the control protocol: whatever a client sends, the host answers with a
//! response (an error for anything malformed) and never panics.
//! `PROPTEST_CASES=100000 cargo test -p microkernel --lib control` runs a longer search.

use std::sync::Arc;

use proptest::prelude::*;

use super::{
    commands::{answer, Context},
    Request, Response,
};
use host::{reload::Verdicts, Kernel, KernelConfig};

fn context() -> Context {
    let (events, _) = crossbeam_channel::unbounded();
    Context {
        kernel: Arc::new(Kernel::new(KernelConfig::default()).unwrap()),
        verdicts: Verdicts::default(),
        events,
        checkpoint: Default::default(),
        fleet: None,
    }
}

fn request() -> impl Strategy<Value = Request> {
    let name = "[a-z]{0,8}|kernel";
    prop_oneof![
        Just(Request::List),
        Just(Request::Checkpoint),
        Just(Request::Fleet),
        (
            name,
            ".{0,8}",
            "[0-9a-f]{0,16}|.{0,8}",
            proptest::option::of(0u64..50)
        )
            .prop_map(|(service, kind, payload, timeout_ms)| Request::Send {
                service,
                kind,
                payload,
                timeout_ms
            }),
        (proptest::option::of(name), any::<bool>())
            .prop_map(|(service, retry)| Request::Reload { service, retry }),
        name.prop_map(|service| Request::Stop { service }),
        name.prop_map(|service| Request::Start { service }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_get_an_answer(line in proptest::collection::vec(any::<u8>(), 0..256)) {
        let context = context();
        let response = answer(&line, &context);
        if serde_json::from_slice::<Request>(&line).is_err() {
            prop_assert!(matches!(response, Response::Error { .. }), "{:?}", response);
        }
    }

    #[test]
    fn every_request_gets_an_answer_and_damaged_ones_an_error(
        request in request(),
        cut in any::<prop::sample::Index>(),
    ) {
        let context = context();
        let line = serde_json::to_vec(&request).unwrap();
        let _ = answer(&line, &context);
        let cut = &line[..cut.index(line.len())];
        let response = answer(cut, &context);
        if serde_json::from_slice::<Request>(cut).is_err() {
            prop_assert!(matches!(response, Response::Error { .. }), "{:?}", response);
        }
    }
}
