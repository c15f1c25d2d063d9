use super::*;

#[test]
fn export_macro_spells_abi_stables_root_module_symbol() {
    assert_eq!(
        abi::ROOT_MODULE_SYMBOL,
        abi_stable::library::ROOT_MODULE_LOADER_NAME
    );
}

#[test]
fn service_names_are_restricted_to_file_name_safe_characters() {
    for good in ["echo", "kv", "a", "echo-v2", "x_1", "0day", &"a".repeat(64)] {
        assert!(is_valid_service_name(good), "{good} should be valid");
    }
    for bad in [
        "",
        "kernel",
        "Echo",
        "-echo",
        "_echo",
        "echo.v2",
        "echo/../x",
        "é",
        " echo",
        &"a".repeat(65),
    ] {
        assert!(!is_valid_service_name(bad), "{bad:?} should be invalid");
    }
}

#[test]
fn guard_turns_errors_and_panics_into_messages() {
    let ok = export_parts::guard("start", || Ok(7));
    assert_eq!(ok.into_result().ok(), Some(7));

    let io = std::io::Error::other("disk on fire");
    let err = export_parts::guard::<()>("start", || Err(Box::new(io)));
    assert_eq!(err.into_result().unwrap_err().as_str(), "disk on fire");

    let panicked = export_parts::guard::<()>("handle", || panic!("boom {}", 42));
    assert_eq!(
        panicked.into_result().unwrap_err().as_str(),
        "handle panicked: boom 42"
    );
}

#[test]
fn replies_round_trip_through_the_abi_type() {
    let reply = Reply::json(&serde_json::json!({"a": 1}));
    assert!(reply.is_ok());
    let back = Reply::from_raw(reply.clone().into_raw());
    assert_eq!(back, reply);
    let value: serde_json::Value = back.data_json().unwrap();
    assert_eq!(value["a"], 1);

    let err = Reply::error(codes::NOT_FOUND, "no such service `x`");
    assert_eq!(err.to_string(), "error 404: no such service `x`");
}

#[test]
fn a_bad_request_is_found_anywhere_in_an_error_chain() {
    #[derive(Debug)]
    struct Wrapping(crate::BadRequest);
    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("while reading the request")
        }
    }
    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let message = crate::Message {
        payload: b"{".to_vec(),
        ..Default::default()
    };
    let parsed = message.json::<crate::serde_json::Value>().unwrap_err();
    assert!(crate::BadRequest::is_in(&*parsed), "{parsed}");
    let wrapped = Wrapping(crate::BadRequest("no".into()));
    assert!(crate::BadRequest::is_in(&wrapped));
    let other: crate::BoxError = "something else broke".into();
    assert!(!crate::BadRequest::is_in(&*other));
}
