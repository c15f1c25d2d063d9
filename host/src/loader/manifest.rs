use plugin_api::{abi::RManifest, is_valid_service_name};

/// The longest version string accepted (it is stored in state file headers).
pub const MAX_VERSION_LEN: usize = 128;

/// A plugin's manifest, copied into host memory and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The service name (validated: `[a-z0-9][a-z0-9_-]{0,63}`).
    pub name: String,
    /// The implementation's version.
    pub version: semver::Version,
    /// Services that must run before this one (validated names, no duplicates, not itself).
    pub dependencies: Vec<String>,
}

impl Manifest {
    /// Stands in while a library is being checked, before its manifest is read.
    pub(crate) fn placeholder() -> Self {
        Manifest {
            name: String::new(),
            version: semver::Version::new(0, 0, 0),
            dependencies: Vec::new(),
        }
    }

    /// Copies and validates a manifest that came from a plugin.
    pub(crate) fn from_raw(raw: &RManifest) -> Result<Self, String> {
        // Bytes from the library: a corrupt one holds anything, UTF-8 or not.
        let dependencies: Vec<String> = raw
            .dependencies
            .iter()
            .map(|dep| lossy(dep.as_bytes()))
            .collect();
        Manifest::from_parts(
            &lossy(raw.name.as_bytes()),
            &lossy(raw.version.as_bytes()),
            &dependencies,
        )
    }

    /// Validates a manifest given as text (read from the library, or sent by a worker
    /// process that read it).
    pub(crate) fn from_parts(
        name: &str,
        version: &str,
        raw_dependencies: &[String],
    ) -> Result<Self, String> {
        if !is_valid_service_name(name) {
            return Err(format!(
                "service name {name:?} is invalid: use 1 to 64 of a-z, 0-9, `_` and `-`, starting with a letter or digit, other than `kernel` (the host's own)"
            ));
        }
        if version.len() > MAX_VERSION_LEN {
            return Err(format!(
                "service `{name}` has a version longer than {MAX_VERSION_LEN} bytes"
            ));
        }
        let version = semver::Version::parse(version).map_err(|e| {
            format!("service `{name}` has version {version:?}, which is not semver: {e}")
        })?;
        let mut dependencies: Vec<String> = Vec::new();
        for dep in raw_dependencies {
            if !is_valid_service_name(dep) {
                return Err(format!(
                    "service `{name}` depends on {dep:?}, which is not a valid service name"
                ));
            }
            if dep == name {
                return Err(format!("service `{name}` depends on itself"));
            }
            if !dependencies.contains(dep) {
                dependencies.push(dep.clone());
            }
        }
        Ok(Manifest {
            name: name.to_owned(),
            version,
            dependencies,
        })
    }
}

/// Text from a plugin's memory, made valid UTF-8 (invalid bytes become U+FFFD).
pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
