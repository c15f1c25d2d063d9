//! Plugins made outside the workspace, as their authors make them: the README's "write your
//! own plugin" recipe followed to the letter (the two files taken from README.md, written to
//! a fresh directory), and the crate `microkernel new-plugin` writes; each tested with its
//! own tests, built with cargo, loaded and called.

use std::fs;

use crate::support::*;

/// The code block that follows `<!-- recipe: NAME -->` in the README.
fn recipe(readme: &str, name: &str) -> String {
    let marker = format!("<!-- recipe: {name} -->");
    let after = &readme[readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"))
        + marker.len()..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

#[test]
fn the_readme_plugin_recipe_builds_loads_and_serves() -> TestResult {
    let readme = fs::read_to_string(workspace().join("README.md"))?;
    let manifest = recipe(&readme, "Cargo.toml");
    let source = recipe(&readme, "src/lib.rs");
    let api = workspace().join("plugin-api");
    let manifest = manifest.replace("../microkernel/plugin-api", api.to_str().unwrap());
    assert!(
        manifest.contains(api.to_str().unwrap()),
        "the recipe's path was not found"
    );

    let root = tempfile::tempdir()?;
    let crate_dir = root.path().join("hello");
    fs::create_dir_all(crate_dir.join("src"))?;
    fs::write(crate_dir.join("Cargo.toml"), manifest)?;
    fs::write(crate_dir.join("src/lib.rs"), source)?;
    let kernel = test_build_and_load(&crate_dir, "hello", 1)?;
    let reply = json(&kernel.request("hello", "greet", b"world", None));
    assert_eq!(
        (reply["hello"].as_str(), reply["greeted"].as_u64()),
        (Some("world"), Some(1))
    );
    Ok(())
}

#[test]
fn a_plugin_written_by_new_plugin_without_plugin_api_builds_passes_its_tests_and_serves(
) -> TestResult {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("tally");
    // No --plugin-api: the source this host was built from (a registry's `plugin-api` is
    // another project's crate, and cargo refused the dependency).
    let made = crate::cli::microkernel(&["new-plugin", "tally", "--path", dir.to_str().unwrap()]);
    assert!(made.status.success(), "{}", crate::cli::stderr(&made));
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
    let api = std::fs::canonicalize(workspace().join("plugin-api"))?;
    assert!(
        manifest.contains(&format!(r#"path = "{}""#, api.display())),
        "{manifest}"
    );
    assert!(crate::cli::stdout(&made).contains("cargo test"));
    let kernel = test_build_and_load(&dir, "tally", 3)?;
    let reply = json(&kernel.request("tally", "count", br#"{"key":"a"}"#, None));
    assert_eq!(reply["count"], 1);
    Ok(())
}

/// Runs the tests of the plugin crate in `dir` (expecting `tests` to pass), builds it, and
/// loads `lib<name>.so` in a kernel, which is returned.
fn test_build_and_load(
    dir: &std::path::Path,
    name: &str,
    tests: usize,
) -> Result<host::Kernel, Box<dyn std::error::Error>> {
    // The workspace's lock file pins the same dependency versions, and the shared target
    // directory with the workspace's debug level reuses their build.
    fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock"))?;
    for command in ["test", "build"] {
        let output = cargo()
            .current_dir(dir)
            .args([
                command,
                "--config",
                "profile.dev.debug=\"line-tables-only\"",
                "--target-dir",
            ])
            .arg(target_dir())
            .output()?;
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "cargo {command}: {said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if command == "test" {
            let passed = format!("test result: ok. {tests} passed");
            assert!(said.contains(&passed), "{said}");
        }
    }
    let plugins = tempfile::tempdir()?;
    let file = format!("lib{name}.so");
    fs::copy(
        target_dir().join("debug").join(&file),
        plugins.path().join(&file),
    )?;
    let kernel = kernel();
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    Ok(kernel)
}
