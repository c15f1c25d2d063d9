//! `microkernel bench`: it runs every measure and writes a summary a program can read. The
//! figures themselves are not checked (no test asserts a time): `--smoke` takes one or two
//! samples of each.

use std::{path::Path, process::Command};

use crate::{
    cli::{microkernel, stderr, stdout},
    support::*,
};

/// Builds the bench's plugins (debug, two start-up services) into `dir`, with the script
/// docs/PERFORMANCE.md tells operators to use.
fn build_bench_plugins(dir: &Path) {
    fixture_dir();
    let mut script = Command::new(workspace().join(".ci/bench-plugins"));
    without_cargo_env(&mut script);
    let output = script
        .arg(dir)
        .arg("--debug")
        .env("SERVICES", "2")
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("the script runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bench_measures_everything_and_writes_a_summary() -> TestResult {
    let root = tempfile::tempdir()?;
    let plugins = root.path().join("plugins");
    let out = root.path().join("out");
    build_bench_plugins(&plugins);
    let run = microkernel(&[
        "bench",
        "--plugins",
        plugins.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--smoke",
        "--fleet",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));

    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    for row in &rows {
        let (value, floor) = (row["value"].as_f64(), row["floor"].as_f64());
        let (Some(value), Some(floor)) = (value, floor) else {
            panic!("a row without figures: {row}");
        };
        assert!(
            value.is_finite() && floor.is_finite() && value >= 0.0,
            "{row}"
        );
        assert!(
            !row["unit"].as_str().unwrap_or_default().is_empty(),
            "{row}"
        );
        match row["ratio"].as_f64() {
            Some(ratio) => assert!(
                (ratio - value / floor).abs() <= 1e-9 * ratio.abs().max(1.0),
                "{row}"
            ),
            None => assert_eq!(floor, 0.0, "{row}"),
        }
        // A goal comes with its verdict; a comparison row has neither.
        assert_eq!(row["goal"].is_string(), row["met"].is_boolean(), "{row}");
        // A spread, when the samples allow one, is a range of ratios over 2 to 5 chunks.
        let spread = &row["spread"];
        if !spread.is_null() {
            let (low, high) = (spread["low"].as_f64(), spread["high"].as_f64());
            assert!(
                matches!((low, high), (Some(l), Some(h)) if l > 0.0 && l <= h),
                "{row}"
            );
            assert!(
                (2..=5).contains(&spread["chunks"].as_u64().unwrap_or(0)),
                "{row}"
            );
        }
    }
    // The request rows have samples enough for one, even in a smoke run.
    let median = rows
        .iter()
        .find(|r| r["measure"] == "request/reply to noop (64 B), median")
        .expect("the request median row");
    assert!(median["spread"].is_object(), "{median}");
    let measures: Vec<&str> = rows.iter().filter_map(|r| r["measure"].as_str()).collect();
    for expected in [
        "request/reply to noop (64 B), median",
        "request/reply to noop (64 B), p90",
        "events to noop, one way, pipelined",
        "out-of-process plugin",
        "swap pause, kv state 1 KiB",
        "swap pause, kv state 64 KiB",
        "ctl reload to the new version serving",
        "persisting 16 MiB of state",
        "resident memory after",
        "memory mappings after",
        "checkpoints of an unchanged state",
        "start-up of 2 services with state on disk",
        "isolated request/reply to noop (64 B), median",
        "JSON-lines peer against isolated request/reply",
        "isolated swap pause, kv 1 KiB",
        "isolated crash to serving again",
        "while an isolated service crashes in a loop",
        "checkpoint of kv (1 KiB state) to etcd",
        "failover: an owner killed",
    ] {
        assert!(
            measures.iter().any(|m| m.contains(expected)),
            "no `{expected}` in {measures:?}"
        );
    }
    // Measured, a checkpoint of an unchanged state writes nothing (a count, not a time).
    let unchanged = rows
        .iter()
        .find(|r| {
            r["measure"]
                .as_str()
                .unwrap_or_default()
                .contains("unchanged")
        })
        .unwrap();
    assert_eq!(unchanged["value"], 0.0, "{unchanged}");
    assert_eq!(unchanged["met"], true);

    let machine: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("machine.json"))?)?;
    assert!(machine["cpus"].as_u64().unwrap_or(0) >= 1, "{machine}");
    let svg = std::fs::read_to_string(out.join("swap-pause.svg"))?;
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.contains("swap pause through the host") && svg.contains("floor"));
    // The table is printed too.
    assert!(
        stdout(&run).contains("swap pause, kv state 1 KiB"),
        "{}",
        stdout(&run)
    );
    Ok(())
}

#[test]
fn bench_without_its_plugins_says_how_to_build_them() {
    let root = tempfile::tempdir().unwrap();
    let run = microkernel(&[
        "bench",
        "--plugins",
        root.path().to_str().unwrap(),
        "--out",
        root.path().join("out").to_str().unwrap(),
        "--quick",
    ]);
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(
        err.contains("libnoop.so is missing") && err.contains(".ci/bench-plugins"),
        "{err}"
    );
}
