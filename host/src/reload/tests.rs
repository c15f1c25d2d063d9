//! The reload decision ([`decide`]) by tables, as `kernel/deps.rs` tests the start order.

use super::*;

/// A candidate file `name` of version `version` whose content is `content` (its digest's
/// first byte).
fn file(name: &str, version: &str, content: u8) -> Candidate {
    let mut sha256 = [0; 32];
    sha256[0] = content;
    Candidate {
        path: PathBuf::from(name),
        sha256,
        version: semver::Version::parse(version).unwrap(),
    }
}

fn sha(content: u8) -> String {
    let mut sha256 = [0; 32];
    sha256[0] = content;
    hex::encode(sha256)
}

fn good(content: u8) -> FileRef {
    FileRef {
        sha256: sha(content),
        file: PathBuf::from("gone.so"),
        version: "1.0.0".into(),
    }
}

/// What a decision comes to, in a word, with the candidates' paths best first.
fn outcome(decision: &Decision) -> (&'static str, Vec<&str>, &'static str) {
    let (action, files) = match &decision.plan {
        None => ("none", vec![]),
        Some((action, candidates)) => (
            match action {
                Action::Add => "add",
                Action::Replace => "replace",
                Action::Restart => "restart",
            },
            candidates
                .iter()
                .map(|c| c.path.to_str().unwrap())
                .collect(),
        ),
    };
    let error = match &decision.error {
        None => "",
        Some(ReloadError::NothingToRun {
            last_good: Some(_), ..
        }) => "nothing to run, last good gone",
        Some(ReloadError::NothingToRun { .. }) => "nothing to run",
        Some(ReloadError::SameVersion { .. }) => "same version",
        Some(_) => "other",
    };
    (action, files, error)
}

#[test]
fn the_highest_version_wins_and_what_runs_decides_the_action() {
    let running = |content: u8, status: Status| Some((sha(content), status));
    type Row = (
        Vec<Candidate>,
        Option<FileRef>,
        Option<(String, Status)>,
        (&'static str, Vec<&'static str>, &'static str),
    );
    let table: Vec<Row> = vec![
        // Nothing runs: add the best, the others as fallbacks.
        (
            vec![file("a1.so", "1.0.0", 1), file("a2.so", "2.0.0", 2)],
            None,
            None,
            ("add", vec!["a2.so", "a1.so"], ""),
        ),
        // The winner runs: nothing to do.
        (
            vec![file("a1.so", "1.0.0", 1), file("a2.so", "2.0.0", 2)],
            None,
            running(2, Status::Running),
            ("none", vec![], ""),
        ),
        // Another file runs: hot replace.
        (
            vec![file("a1.so", "1.0.0", 1), file("a2.so", "2.0.0", 2)],
            None,
            running(1, Status::Running),
            ("replace", vec!["a2.so", "a1.so"], ""),
        ),
        // The winner is loaded but failed, or was never started: start it again.
        (
            vec![file("a2.so", "2.0.0", 2)],
            None,
            running(2, Status::Failed),
            ("restart", vec!["a2.so"], ""),
        ),
        (
            vec![file("a2.so", "2.0.0", 2)],
            None,
            running(2, Status::Registered),
            ("restart", vec!["a2.so"], ""),
        ),
        // Stopped on purpose: left stopped.
        (
            vec![file("a2.so", "2.0.0", 2)],
            None,
            running(2, Status::Stopped),
            ("none", vec![], ""),
        ),
        // Every file rejected, nothing runs: say so, and where the last good file went.
        (
            vec![],
            Some(good(9)),
            None,
            ("none", vec![], "nothing to run, last good gone"),
        ),
        (vec![], None, None, ("none", vec![], "nothing to run")),
        // Every file rejected, a version runs: it keeps running, silently.
        (
            vec![],
            None,
            running(1, Status::Running),
            ("none", vec![], ""),
        ),
        // Two files of the highest version: ambiguous; what runs keeps running.
        (
            vec![
                file("x.so", "2.0.0", 2),
                file("y.so", "2.0.0", 3),
                file("old.so", "1.0.0", 1),
            ],
            None,
            running(1, Status::Running),
            ("none", vec![], "same version"),
        ),
        // ... and at a restart, the last good one of the two starts, older ones behind it.
        (
            vec![
                file("x.so", "2.0.0", 2),
                file("y.so", "2.0.0", 3),
                file("old.so", "1.0.0", 1),
            ],
            Some(good(3)),
            None,
            ("add", vec!["y.so", "old.so"], "same version"),
        ),
        // ... unless neither is the last good one: nothing starts.
        (
            vec![file("x.so", "2.0.0", 2), file("y.so", "2.0.0", 3)],
            Some(good(7)),
            None,
            ("none", vec![], "same version"),
        ),
        // The same bytes under two names are not ambiguous.
        (
            vec![file("b.so", "2.0.0", 2), file("a.so", "2.0.0", 2)],
            None,
            None,
            ("add", vec!["a.so", "b.so"], ""),
        ),
    ];
    for (row, (chosen, last_good, running, expected)) in table.into_iter().enumerate() {
        let decision = decide("svc", chosen, last_good, running.as_ref(), &|_| false);
        assert_eq!(outcome(&decision), expected, "row {row}");
    }
}
