//! A plugin's own libraries: the shared libraries it finds through an `$ORIGIN` run path
//! (`-Wl,-rpath,$ORIGIN/lib`), as plugins that wrap a vendor's C or C++ library ship them.
//!
//! The host opens a private copy of every plugin file (see `load.rs`), in a directory of its
//! own, where `$ORIGIN` finds nothing. So the libraries a plugin names (`DT_NEEDED`) that its
//! `$ORIGIN` run paths find where it was deployed are copied beside its private copy, at the
//! same relative place, and opened with it: like the plugin, they are pinned (a dependency
//! overwritten in the plugins directory changes no code under a running plugin).

use std::path::{Component, Path, PathBuf};

/// One library to copy: where it is, and where it goes relative to the plugin's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bundled {
    /// The file found through `$ORIGIN`, where the plugin was deployed.
    pub source: PathBuf,
    /// Its place relative to the plugin's directory (`lib/libhelper.so`).
    pub relative: PathBuf,
}

/// The libraries of the plugin `path` (its content `bytes`) that its `$ORIGIN` run paths
/// find beside it. Run paths that leave the plugin's directory (`$ORIGIN/..`) or do not
/// start with `$ORIGIN` are left to the dynamic loader. A file whose dynamic section cannot
/// be read has none: the probe and `dlopen` then say what is wrong with it, as for any
/// damaged file.
pub(super) fn bundled(path: &Path, bytes: &[u8]) -> Vec<Bundled> {
    let Ok(elf) = goblin::elf::Elf::parse(bytes) else {
        return Vec::new();
    };
    let origin = path.parent().unwrap_or(Path::new("."));
    let dirs: Vec<PathBuf> = elf
        .runpaths
        .iter()
        .chain(elf.rpaths.iter())
        .flat_map(|list| list.split(':'))
        .filter_map(relative_to_origin)
        .collect();
    let mut found = Vec::new();
    for name in &elf.libraries {
        if name.contains('/') {
            continue;
        }
        for dir in &dirs {
            let source = origin.join(dir).join(name);
            if source.is_file() {
                found.push(Bundled {
                    source,
                    relative: dir.join(name),
                });
                break;
            }
        }
    }
    found
}

/// `lib` for `$ORIGIN/lib` (or `${ORIGIN}/lib`), an empty path for `$ORIGIN`; `None` for a
/// run path that is not below `$ORIGIN`.
fn relative_to_origin(entry: &str) -> Option<PathBuf> {
    let rest = entry
        .strip_prefix("$ORIGIN")
        .or_else(|| entry.strip_prefix("${ORIGIN}"))?;
    let relative = PathBuf::from(rest.trim_start_matches('/'));
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then_some(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_run_paths_below_origin_are_taken() {
        assert_eq!(relative_to_origin("$ORIGIN"), Some(PathBuf::new()));
        assert_eq!(
            relative_to_origin("$ORIGIN/lib"),
            Some(PathBuf::from("lib"))
        );
        assert_eq!(
            relative_to_origin("${ORIGIN}/vendor/lib"),
            Some(PathBuf::from("vendor/lib"))
        );
        assert_eq!(relative_to_origin("$ORIGIN/../lib"), None);
        assert_eq!(relative_to_origin("/usr/lib"), None);
    }
}
