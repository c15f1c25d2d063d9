//! The host's configuration file (`run --config FILE`, TOML): a key for every `run` option
//! (the command line wins over the file), and `[service.NAME]` sections with the host's
//! settings for one service (its mode, how its worker restarts, its limits). A service's
//! own configuration stays `<plugins-dir>/<service>.conf`, which the plugin reads.
//!
//! ```toml
//! plugins = "/srv/microkernel/plugins"
//! state-dir = "/var/lib/microkernel"
//! checkpoint-interval = "2s"
//!
//! [service.imagemagick]
//! isolate = true
//! max-restarts = 5
//! restart-window = "1m"
//! memory-max = "512MiB"
//! ```
//!
//! Unknown keys, and values of the wrong kind, are errors naming the file, the line and the
//! key. SIGHUP reads the file again: the `[service.*]` sections take effect (a service whose
//! mode changed is moved by a hot replace, with its state); the other keys are read at
//! start-up only, and a change to one is said in the log.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use clap::parser::ValueSource;
use serde::{Deserialize, Deserializer};

use crate::cli::{LogFormat, OnBadState, RunArgs};
use host::worker::Isolation;

/// What a configuration file holds: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub plugins: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub old_key_files: Option<Vec<PathBuf>>,
    pub no_state: Option<bool>,
    pub on_bad_state: Option<BadState>,
    #[serde(default, deserialize_with = "duration")]
    pub checkpoint_interval: Option<Duration>,
    pub pid_file: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub watch: Option<bool>,
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "at_least_one")]
    pub mailbox_capacity: Option<u32>,
    #[serde(default, deserialize_with = "timeout")]
    pub request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub spin: Option<Duration>,
    #[serde(default, deserialize_with = "timeout")]
    pub operation_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "timeout")]
    pub probe_timeout: Option<Duration>,
    pub shadow_dir: Option<PathBuf>,
    pub allow_sha256: Option<PathBuf>,
    pub allow_insecure_permissions: Option<bool>,
    pub log_level: Option<String>,
    pub log_format: Option<Format>,
    pub cluster: Option<String>,
    pub node: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    pub lease_ttl: Option<Duration>,
    pub cluster_prefix: Option<String>,
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    /// `[service.NAME]` sections.
    #[serde(default)]
    pub service: BTreeMap<String, ServiceSection>,
}

/// `on-bad-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadState {
    Refuse,
    Quarantine,
}

/// `log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Text,
    Json,
}

/// A `[service.NAME]` section: the host's settings for one service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceSection {
    /// Run the service in a worker process of its own.
    #[serde(default)]
    pub isolate: bool,
    /// Crashes of its worker tolerated within `restart-window` (default 5).
    pub max_restarts: Option<u32>,
    /// The window crashes are counted in (default `1m`).
    #[serde(default, deserialize_with = "timeout")]
    pub restart_window: Option<Duration>,
    /// The wait before the second restart within the window, doubled each time (default
    /// `100ms`).
    #[serde(default, deserialize_with = "duration")]
    pub restart_backoff: Option<Duration>,
    /// The longest wait before a restart (default `10s`).
    #[serde(default, deserialize_with = "duration")]
    pub restart_backoff_max: Option<Duration>,
    /// The worker's address-space limit: bytes, or with a unit (`512MiB`, `2GiB`).
    #[serde(default, deserialize_with = "bytes")]
    pub memory_max: Option<u64>,
    /// Confine the worker with Landlock to reading its plugin file and the system's
    /// libraries (best effort: `ctl list` says what the kernel enforced).
    pub landlock: Option<bool>,
}

impl ServiceSection {
    /// The keys that mean something only for an isolated service.
    fn worker_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.max_restarts.is_some() {
            keys.push("max-restarts");
        }
        if self.restart_window.is_some() {
            keys.push("restart-window");
        }
        if self.restart_backoff.is_some() {
            keys.push("restart-backoff");
        }
        if self.restart_backoff_max.is_some() {
            keys.push("restart-backoff-max");
        }
        if self.memory_max.is_some() {
            keys.push("memory-max");
        }
        if self.landlock.is_some() {
            keys.push("landlock");
        }
        keys
    }

    /// The supervision settings of an isolated service, defaults filled in: the longest
    /// backoff by default is 10 s, or half of `operation_timeout` when that is shorter.
    pub fn isolation(&self, operation_timeout: Duration) -> Isolation {
        let defaults = Isolation::default();
        let backoff_max = defaults.backoff_max.min(operation_timeout / 2);
        Isolation {
            max_restarts: self.max_restarts.unwrap_or(defaults.max_restarts),
            restart_window: self.restart_window.unwrap_or(defaults.restart_window),
            backoff: self
                .restart_backoff
                .unwrap_or(defaults.backoff.min(backoff_max)),
            backoff_max: self.restart_backoff_max.unwrap_or(backoff_max),
            memory_max: self.memory_max,
            landlock: self.landlock.unwrap_or(false),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    crate::cli::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    crate::cli::parse_timeout(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(Some(n)),
    }
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    let size = match Size::deserialize(d)? {
        Size::Number(n) => n,
        Size::Text(text) => parse_bytes(&text).map_err(serde::de::Error::custom)?,
    };
    if size < 16 << 20 {
        return Err(serde::de::Error::custom(format!(
            "{size} bytes is too small for a worker (at least 16MiB)"
        )));
    }
    Ok(Some(size))
}

/// Parses `1073741824`, `512MiB`, `2GiB`, `64M`, `1G` (powers of 1024 either way).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write 512MiB, 2GiB or a number of bytes)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Reads and checks a configuration file.
pub fn read(path: &Path) -> anyhow::Result<FileConfig> {
    let text = host::bounded::read_to_string(path, host::bounded::MAX_CONFIG_SIZE)
        .with_context(|| format!("reading configuration file {}", path.display()))?;
    let config: FileConfig = toml::from_str(&text).map_err(|error| {
        // toml's message names the line, the column and the key, and quotes the line.
        anyhow::anyhow!("configuration file {}: {error}", path.display())
    })?;
    for (name, section) in &config.service {
        if !plugin_api::is_valid_service_name(name) {
            anyhow::bail!(
                "configuration file {}: [service.{name}]: {name:?} is not a service name (1 to 64 of a-z, 0-9, `_` and `-`, starting with a letter or digit; `kernel` is the host's own)",
                path.display()
            );
        }
        let keys = section.worker_keys();
        if !section.isolate && !keys.is_empty() {
            let (verb, them) = if keys.len() == 1 {
                ("applies", "it")
            } else {
                ("apply", "them")
            };
            let line = line_of(&text, name, keys[0])
                .map(|line| format!(", line {line}"))
                .unwrap_or_default();
            anyhow::bail!(
                "configuration file {}{line}: [service.{name}]: {} only {verb} to an isolated service; add `isolate = true` or remove {them}",
                path.display(),
                keys.join(", ")
            );
        }
    }
    Ok(config)
}

/// Checks the effective settings as a whole (the file merged under the command line):
/// what no single key can say wrong. `file` names the configuration file in the errors.
pub fn validate(
    args: &RunArgs,
    isolation: &BTreeMap<String, Isolation>,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let named = |what: String| match file {
        Some(path) => format!("configuration file {}: {what}", path.display()),
        None => what,
    };
    if args.no_state && (args.keys.key_file.is_some() || !args.keys.old_key_files.is_empty()) {
        anyhow::bail!(named(
            "`no-state` and a key file (`key-file`, `old-key-files`) together: persist state or not, not both".to_owned()
        ));
    }
    fleet_config(args).map_err(|e| anyhow::anyhow!(named(e)))?;
    validate_isolation(isolation, args.operation_timeout, file)
}

/// How this host joins its fleet (`cluster` and the keys that go with it), or `None`
/// without `cluster`. Refuses what cannot work: a fleet without persisted state, a lease
/// etcd would not keep, fleet options without a fleet.
pub fn fleet_config(args: &RunArgs) -> Result<Option<fleet::FleetConfig>, String> {
    let cluster = &args.cluster;
    let Some(url) = &cluster.cluster else {
        let stray = [
            ("node", cluster.node.is_some()),
            ("lease-ttl", cluster.lease_ttl.is_some()),
            ("cluster-prefix", cluster.cluster_prefix.is_some()),
            ("etcd-ca-file", cluster.etcd_ca_file.is_some()),
            ("etcd-cert-file", cluster.etcd_cert_file.is_some()),
            ("etcd-key-file", cluster.etcd_key_file.is_some()),
            ("etcd-user", cluster.etcd_user.is_some()),
            ("etcd-password-file", cluster.etcd_password_file.is_some()),
        ];
        if let Some((option, _)) = stray.iter().find(|(_, given)| *given) {
            return Err(format!("`{option}` is for a fleet: give `cluster` too"));
        }
        return Ok(None);
    };
    if args.no_state {
        return Err(
            "`no-state` with `cluster`: a fleet keeps every service's state in etcd, sealed with the state key".into(),
        );
    }
    let lease_ttl = cluster.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
    fleet::check_lease_ttl(lease_ttl).map_err(|e| format!("`lease-ttl`: {e}"))?;
    let mut endpoints = fleet::Endpoints::parse(url).map_err(|e| format!("`cluster`: {e}"))?;
    endpoints.ca_file = cluster.etcd_ca_file.clone();
    endpoints.cert_file = cluster.etcd_cert_file.clone();
    endpoints.key_file = cluster.etcd_key_file.clone();
    endpoints.user = cluster.etcd_user.clone();
    endpoints.password_file = cluster.etcd_password_file.clone();
    if endpoints.cert_file.is_some() != endpoints.key_file.is_some() {
        return Err("`etcd-cert-file` and `etcd-key-file` go together".into());
    }
    if endpoints.user.is_some() != endpoints.password_file.is_some() {
        return Err("`etcd-user` and `etcd-password-file` go together".into());
    }
    let node = match &cluster.node {
        Some(node) => node.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .ok_or("no `node` given, and the machine's host name could not be read")?,
    };
    fleet::check_node_name(&node).map_err(|e| format!("`node`: {e}"))?;
    let prefix = cluster.cluster_prefix.as_deref().unwrap_or(DEFAULT_PREFIX);
    if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
        return Err(format!(
            "`cluster-prefix` must be a key path such as /microkernel (got `{prefix}`)"
        ));
    }
    Ok(Some(fleet::FleetConfig {
        endpoints,
        node,
        lease_ttl,
        prefix: prefix.to_owned(),
    }))
}

/// `lease-ttl` when not given.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// `cluster-prefix` when not given.
const DEFAULT_PREFIX: &str = "/microkernel";

/// Checks the isolated services' settings against each other and the operation timeout
/// (at start-up, and for a file read again at SIGHUP).
pub fn validate_isolation(
    isolation: &BTreeMap<String, Isolation>,
    operation_timeout: Duration,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let named = |what: String| match file {
        Some(path) => format!("configuration file {}: {what}", path.display()),
        None => what,
    };
    for (service, settings) in isolation {
        if settings.backoff > settings.backoff_max {
            anyhow::bail!(named(format!(
                "[service.{service}]: restart-backoff ({:?}) is longer than restart-backoff-max ({:?})",
                settings.backoff, settings.backoff_max
            )));
        }
        // A request waits for a restart's backoff on the executor, and operations queued
        // behind it with it: the backoff must end well within the operation timeout.
        if settings.backoff_max * 2 > operation_timeout {
            anyhow::bail!(named(format!(
                "[service.{service}]: restart-backoff-max ({:?}) must be at most half of operation-timeout ({:?})",
                settings.backoff_max, operation_timeout
            )));
        }
    }
    Ok(())
}

/// The line (from 1) where `key` is set in the `[service.NAME]` section of `text`, as
/// far as a plain reading of the lines tells.
fn line_of(text: &str, service: &str, key: &str) -> Option<usize> {
    let header = format!("[service.{service}]");
    let mut inside = false;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line.replace(' ', "") == header;
        } else if inside && line.split('=').next().map(str::trim) == Some(key) {
            return Some(index + 1);
        }
    }
    None
}

/// The isolated services of a configuration, with their settings.
pub fn isolation(config: &FileConfig, operation_timeout: Duration) -> BTreeMap<String, Isolation> {
    config
        .service
        .iter()
        .filter(|(_, section)| section.isolate)
        .map(|(name, section)| (name.clone(), section.isolation(operation_timeout)))
        .collect()
}

/// Whether the `run` argument `id` was given (on the command line or in the environment),
/// so that it wins over the file.
pub type Given<'a> = &'a dyn Fn(&str) -> bool;

/// What clap's matches say of `id`.
pub fn given_in(matches: &clap::ArgMatches) -> impl Fn(&str) -> bool + '_ {
    move |id| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

/// Fills the `run` options not given on the command line from the file.
pub fn merge(args: &mut RunArgs, file: &FileConfig, given: Given<'_>) {
    fn set<T: Clone>(given: Given<'_>, id: &str, target: &mut T, value: &Option<T>) {
        if let (false, Some(value)) = (given(id), value) {
            *target = value.clone();
        }
    }
    fn set_opt<T: Clone>(given: Given<'_>, id: &str, target: &mut Option<T>, value: &Option<T>) {
        if let (false, Some(value)) = (given(id), value) {
            *target = Some(value.clone());
        }
    }
    set_opt(given, "plugins", &mut args.plugins, &file.plugins);
    set(given, "dir", &mut args.state.dir, &file.state_dir);
    set_opt(given, "key_file", &mut args.keys.key_file, &file.key_file);
    set(
        given,
        "old_key_files",
        &mut args.keys.old_key_files,
        &file.old_key_files,
    );
    set(given, "no_state", &mut args.no_state, &file.no_state);
    let on_bad_state = file.on_bad_state.map(|p| match p {
        BadState::Refuse => OnBadState::Refuse,
        BadState::Quarantine => OnBadState::Quarantine,
    });
    set(given, "on_bad_state", &mut args.on_bad_state, &on_bad_state);
    set(
        given,
        "checkpoint_interval",
        &mut args.checkpoint_interval,
        &file.checkpoint_interval,
    );
    set_opt(given, "pid_file", &mut args.pid_file, &file.pid_file);
    set_opt(given, "socket", &mut args.socket, &file.socket);
    set(given, "watch", &mut args.watch, &file.watch);
    set_opt(
        given,
        "metrics_listen",
        &mut args.metrics_listen,
        &file.metrics_listen,
    );
    set(
        given,
        "mailbox_capacity",
        &mut args.mailbox_capacity,
        &file.mailbox_capacity,
    );
    set(
        given,
        "request_timeout",
        &mut args.request_timeout,
        &file.request_timeout,
    );
    set(given, "spin", &mut args.spin, &file.spin);
    set(
        given,
        "operation_timeout",
        &mut args.operation_timeout,
        &file.operation_timeout,
    );
    set(
        given,
        "probe_timeout",
        &mut args.probe_timeout,
        &file.probe_timeout,
    );
    set_opt(given, "shadow_dir", &mut args.shadow_dir, &file.shadow_dir);
    set_opt(
        given,
        "allow_sha256",
        &mut args.allow_sha256,
        &file.allow_sha256,
    );
    set(
        given,
        "allow_insecure_permissions",
        &mut args.allow_insecure_permissions,
        &file.allow_insecure_permissions,
    );
    let cluster = &mut args.cluster;
    set_opt(given, "cluster", &mut cluster.cluster, &file.cluster);
    set_opt(given, "node", &mut cluster.node, &file.node);
    set_opt(given, "lease_ttl", &mut cluster.lease_ttl, &file.lease_ttl);
    set_opt(
        given,
        "cluster_prefix",
        &mut cluster.cluster_prefix,
        &file.cluster_prefix,
    );
    set_opt(
        given,
        "etcd_ca_file",
        &mut cluster.etcd_ca_file,
        &file.etcd_ca_file,
    );
    set_opt(
        given,
        "etcd_cert_file",
        &mut cluster.etcd_cert_file,
        &file.etcd_cert_file,
    );
    set_opt(
        given,
        "etcd_key_file",
        &mut cluster.etcd_key_file,
        &file.etcd_key_file,
    );
    set_opt(given, "etcd_user", &mut cluster.etcd_user, &file.etcd_user);
    set_opt(
        given,
        "etcd_password_file",
        &mut cluster.etcd_password_file,
        &file.etcd_password_file,
    );
}

/// The global log options from the file, where the command line did not give them.
pub fn merge_logging(
    level: &mut Option<String>,
    format: &mut LogFormat,
    file: &FileConfig,
    given: Given<'_>,
) {
    if !given("log_level") {
        if let Some(file_level) = &file.log_level {
            *level = Some(file_level.clone());
        }
    }
    if !given("log_format") {
        if let Some(file_format) = file.log_format {
            *format = match file_format {
                Format::Text => LogFormat::Text,
                Format::Json => LogFormat::Json,
            };
        }
    }
}

/// The effective settings, one `key = value` line each, as `run --check` prints them.
pub fn effective(args: &RunArgs, isolation: &BTreeMap<String, Isolation>) -> String {
    let path = |p: &Option<PathBuf>| match p {
        Some(p) => format!("{:?}", p.display().to_string()),
        None => "(none)".to_owned(),
    };
    let time = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
    let mut lines = vec![
        format!("plugins = {}", path(&args.plugins)),
        format!("state-dir = {:?}", args.state.dir.display().to_string()),
        format!("key-file = {}", path(&args.keys.key_file)),
        format!(
            "old-key-files = [{}]",
            args.keys
                .old_key_files
                .iter()
                .map(|p| format!("{:?}", p.display().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!("no-state = {}", args.no_state),
        format!(
            "on-bad-state = \"{}\"",
            match args.on_bad_state {
                OnBadState::Refuse => "refuse",
                OnBadState::Quarantine => "quarantine",
            }
        ),
        format!("checkpoint-interval = {}", time(args.checkpoint_interval)),
        format!("pid-file = {}", path(&args.pid_file)),
        format!("socket = {}", path(&args.socket)),
        format!("watch = {}", args.watch),
        format!(
            "metrics-listen = {}",
            args.metrics_listen
                .map_or("(none)".to_owned(), |a| format!("\"{a}\""))
        ),
        format!("mailbox-capacity = {}", args.mailbox_capacity),
        format!("request-timeout = {}", time(args.request_timeout)),
        format!("spin = {}", time(args.spin)),
        format!("operation-timeout = {}", time(args.operation_timeout)),
        format!("probe-timeout = {}", time(args.probe_timeout)),
        format!("shadow-dir = {}", path(&args.shadow_dir)),
        format!("allow-sha256 = {}", path(&args.allow_sha256)),
        format!(
            "allow-insecure-permissions = {}",
            args.allow_insecure_permissions
        ),
    ];
    let cluster = &args.cluster;
    let text = |t: &Option<String>| t.as_ref().map_or("(none)".to_owned(), |t| format!("{t:?}"));
    lines.extend([
        format!("cluster = {}", text(&cluster.cluster)),
        format!("node = {}", text(&cluster.node)),
        format!(
            "lease-ttl = {}",
            time(cluster.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL))
        ),
        format!(
            "cluster-prefix = {:?}",
            cluster.cluster_prefix.as_deref().unwrap_or(DEFAULT_PREFIX)
        ),
        format!("etcd-ca-file = {}", path(&cluster.etcd_ca_file)),
        format!("etcd-cert-file = {}", path(&cluster.etcd_cert_file)),
        format!("etcd-key-file = {}", path(&cluster.etcd_key_file)),
        format!("etcd-user = {}", text(&cluster.etcd_user)),
        format!("etcd-password-file = {}", path(&cluster.etcd_password_file)),
    ]);
    for (name, settings) in isolation {
        lines.push(String::new());
        lines.push(format!("[service.{name}]"));
        lines.push("isolate = true".to_owned());
        lines.push(format!("max-restarts = {}", settings.max_restarts));
        lines.push(format!(
            "restart-window = {}",
            time(settings.restart_window)
        ));
        lines.push(format!("restart-backoff = {}", time(settings.backoff)));
        lines.push(format!(
            "restart-backoff-max = {}",
            time(settings.backoff_max)
        ));
        lines.push(format!(
            "memory-max = {}",
            settings
                .memory_max
                .map_or("(none)".to_owned(), |b| b.to_string())
        ));
        lines.push(format!("landlock = {}", settings.landlock));
    }
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_key_parses_and_services_get_their_settings() {
        let config = parse(
            r#"
plugins = "/p"
checkpoint-interval = "2s"
mailbox-capacity = 8
[service.kv]
isolate = true
max-restarts = 3
memory-max = "512MiB"
"#,
        )
        .unwrap();
        assert_eq!(config.checkpoint_interval, Some(Duration::from_secs(2)));
        let isolation = isolation(&config, Duration::from_secs(30));
        assert_eq!(isolation["kv"].max_restarts, 3);
        assert_eq!(isolation["kv"].memory_max, Some(512 << 20));
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_names_the_line_and_the_key() {
        let error = parse("plugins = \"/p\"\ncheckpoint-intervall = \"2s\"\n").unwrap_err();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("checkpoint-intervall"), "{error}");
        let error = parse("\n\noperation-timeout = \"0\"\n").unwrap_err();
        assert!(error.contains("line 3"), "{error}");
        assert!(error.contains("longer than 0"), "{error}");
        let error = parse("[service.kv]\nisolate = \"yes\"\n").unwrap_err();
        assert!(
            error.contains("line 2") && error.contains("isolate"),
            "{error}"
        );
        let error =
            parse("[service.kv]\nisolate = true\nmemory-max = \"12 parsecs\"\n").unwrap_err();
        assert!(
            error.contains("line 3") && error.contains("unit"),
            "{error}"
        );
    }

    #[test]
    fn a_worker_key_outside_isolation_is_found_on_its_line() {
        let text = "plugins = \"/p\"\n[service.kv]\nmax-restarts = 3\n[service.echo]\nisolate = true\nmax-restarts = 2\n";
        assert_eq!(line_of(text, "kv", "max-restarts"), Some(3));
        assert_eq!(line_of(text, "echo", "max-restarts"), Some(6));
        assert_eq!(line_of(text, "echo", "memory-max"), None);
    }

    fn run_args(args: &[&str]) -> RunArgs {
        use clap::Parser;
        let all = ["microkernel", "run", "--plugins", "/p"]
            .iter()
            .chain(args)
            .copied();
        match crate::cli::Cli::try_parse_from(all)
            .expect("valid options")
            .command
        {
            crate::cli::Command::Run(run) => run,
            _ => unreachable!("a run command"),
        }
    }

    #[test]
    fn fleet_options_are_refused_when_they_cannot_work() {
        let refused = |args: &[&str], says: &str| {
            let error = fleet_config(&run_args(args)).expect_err("refused");
            assert!(error.contains(says), "{args:?}: {error}");
        };
        refused(&["--lease-ttl", "7s"], "`lease-ttl` is for a fleet");
        refused(
            &["--cluster-prefix", "/x"],
            "`cluster-prefix` is for a fleet",
        );
        refused(&["--node", "a"], "`node` is for a fleet");
        refused(&["--cluster", "etcd://h:99999"], "`99999` is not a port");
        refused(&["--cluster", "http://h:1"], "not an etcd address");
        refused(
            &["--cluster", "etcd://h:1", "--node", "a/b"],
            "node name `a/b`",
        );
        refused(&["--cluster", "etcd://h:1", "--node", ""], "node name ``");
        refused(
            &["--cluster", "etcd://h:1", "--cluster-prefix", "x"],
            "key path",
        );
        refused(
            &["--cluster", "etcd://h:1", "--lease-ttl", "1s"],
            "at least 2s",
        );
        refused(
            &["--cluster", "etcd://h:1", "--lease-ttl", "2500ms"],
            "whole seconds",
        );
        refused(
            &["--cluster", "etcd://h:1", "--no-state"],
            "`no-state` with `cluster`",
        );
        let config = fleet_config(&run_args(&["--cluster", "etcd://h:1,g:2", "--node", "a"]))
            .expect("valid")
            .expect("a fleet");
        assert_eq!(config.endpoints.members, ["h:1", "g:2"]);
        assert_eq!(config.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        assert!(fleet_config(&run_args(&[])).expect("valid").is_none());
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert!(parse_bytes("MiB").is_err());
    }
}
