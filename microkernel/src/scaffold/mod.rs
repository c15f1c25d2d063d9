//! `microkernel new-plugin`: writes a plugin crate that builds out of tree against
//! `plugin-api`, with a stateful example service, its tests (with the test kit) and a README.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

const CARGO_TOML: &str = include_str!("Cargo.toml.template");
const LIB_RS: &str = include_str!("lib.rs.template");
const README: &str = include_str!("README.md.template");

/// Where `plugin-api` comes from in the crate written: a path to a `plugin-api` directory.
/// (It is not published in a registry: the name `plugin-api` there is another project's.)
#[derive(Debug, Clone)]
pub enum Api {
    /// A path to a `plugin-api` directory.
    Path(PathBuf),
}

impl Api {
    /// The `plugin-api` source this host was built from, when it is still on this machine;
    /// otherwise an error that says to name one.
    pub fn built_from() -> anyhow::Result<Api> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
        if source.join("Cargo.toml").is_file() {
            return Ok(Api::Path(source));
        }
        bail!(
            "no plugin-api to depend on: the source this host was built from ({}) is not on this machine, and plugin-api is not published in a registry; name a checkout of it with --plugin-api PATH",
            source.display()
        )
    }

    /// The dependency's value in `Cargo.toml`, with the test kit's feature or not.
    fn dependency(&self, testing: bool) -> anyhow::Result<String> {
        let features = if testing {
            r#", features = ["testing"]"#
        } else {
            ""
        };
        Ok(match self {
            Api::Path(path) => {
                let path = fs::canonicalize(path)
                    .with_context(|| format!("plugin-api at {}", path.display()))?;
                if !path.join("Cargo.toml").is_file() {
                    bail!("{} holds no Cargo.toml: not plugin-api", path.display());
                }
                // TOML basic string: `\` and `"` escaped.
                let quoted = path
                    .to_string_lossy()
                    .replace('\\', r"\\")
                    .replace('"', "\\\"");
                format!(r#"{{ path = "{quoted}", package = "microkernel-plugin-sdk"{features} }}"#)
            }
        })
    }
}

/// Writes the crate of service `name` into `dir` (created; it must not exist, or be
/// empty). Returns the files written.
pub fn new_plugin(name: &str, dir: &Path, api: &Api) -> anyhow::Result<Vec<PathBuf>> {
    if !plugin_api::is_valid_service_name(name) {
        bail!(
            "`{name}` is not a valid service name: use 1 to 64 of a-z, 0-9, `_` and `-`, starting with a letter or digit"
        );
    }
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} already exists and is not empty: nothing written (choose another --path)",
                dir.display()
            );
        }
    }
    let fill = |template: &str| -> anyhow::Result<String> {
        Ok(template
            .replace("__API_TESTING__", &api.dependency(true)?)
            .replace("__API__", &api.dependency(false)?)
            .replace("__LIB__", &name.replace('-', "_"))
            .replace("__NAME__", name))
    };
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)?),
        ("src/lib.rs", fill(LIB_RS)?),
        ("README.md", fill(README)?),
        (".gitignore", "/target\n".to_owned()),
    ];
    fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.join("src").display()))?;
    let mut written = Vec::new();
    for (file, text) in files {
        let path = dir.join(file);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_and_a_bad_name_or_a_full_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("my-counter");
        let api = Api::Path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api"));
        let written = new_plugin("my-counter", &dir, &api).unwrap();
        assert_eq!(written.len(), 4);
        for file in &written {
            let text = fs::read_to_string(file).unwrap();
            assert!(!text.contains("__"), "{}: {text}", file.display());
        }
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains(r#"features = ["testing"]"#), "{manifest}");
        let readme = fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.contains("libmy_counter.so"), "{readme}");

        let again = new_plugin("my-counter", &dir, &api).unwrap_err();
        assert!(again.to_string().contains("not empty"), "{again}");
        let bad = new_plugin("My Counter", &root.path().join("x"), &api).unwrap_err();
        assert!(
            bad.to_string().contains("not a valid service name"),
            "{bad}"
        );
        // Without --plugin-api: the source this host was built from, never a registry's
        // `plugin-api` (another project's crate).
        let Api::Path(built_from) = Api::built_from().unwrap();
        let dependency = Api::Path(built_from).dependency(false).unwrap();
        assert!(dependency.starts_with("{ path = "), "{dependency}");
    }
}
