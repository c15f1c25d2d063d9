//! The command line of `microkernel`.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use host::BadStatePolicy;

/// `--on-bad-state`: the command line's name for [`BadStatePolicy`] (the engine knows no
/// command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBadState {
    /// Leave the file untouched and do not start the service.
    Refuse,
    /// Move the file aside to `<service>.state.bad-<timestamp>` and start the service fresh.
    Quarantine,
}

impl From<OnBadState> for BadStatePolicy {
    fn from(policy: OnBadState) -> BadStatePolicy {
        match policy {
            OnBadState::Refuse => BadStatePolicy::Refuse,
            OnBadState::Quarantine => BadStatePolicy::Quarantine,
        }
    }
}

/// A plugin host that runs services from shared libraries and replaces them while they run.
#[derive(Debug, Parser)]
#[command(name = "microkernel", version, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a filter like `info,plugin=debug`;
    /// `RUST_LOG`, when set, takes precedence. [default: info; warn for `bench`]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format: `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, colored on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; `run`'s options are most of it"
)]
pub enum Command {
    /// Run the host: load every plugin of a directory, start the services, serve until
    /// SIGINT or SIGTERM. SIGHUP rescans the directory and hot-replaces changed services.
    /// Under a service manager that sets $NOTIFY_SOCKET (systemd's Type=notify), reports
    /// READY=1, RELOADING=1 and STOPPING=1.
    Run(RunArgs),
    /// Write a new random state key (64 hex digits) to a file with mode 0600.
    Keygen {
        /// The file to create; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Ask a running host to rescan its plugins directory (sends SIGHUP, only to the process
    /// that holds the PID file's lock: a host started with it).
    Reload {
        /// The PID file the host was started with (`run --pid-file`).
        #[arg(long, value_name = "PATH")]
        pid_file: PathBuf,
    },
    /// Talk to a running host through its control socket.
    Ctl(CtlArgs),
    /// Decrypt a state file and print its header and content.
    InspectState(InspectArgs),
    /// Write a new plugin crate: a stateful example service, its tests (with plugin-api's
    /// test kit) and a README saying how to build it and drop it in. It builds anywhere: it
    /// is a workspace of its own.
    NewPlugin {
        /// The service's name (and the crate's): 1 to 64 of a-z, 0-9, `_` and `-`.
        name: String,
        /// Where to write it (created; must not exist, or be empty) [default: ./NAME].
        #[arg(long, value_name = "DIR")]
        path: Option<PathBuf>,
        /// The plugin-api directory to depend on; without it, the plugin-api source this
        /// host was built from, if it is still on this machine (it is not in a registry).
        #[arg(long, value_name = "PATH")]
        plugin_api: Option<PathBuf>,
    },
    /// Measure what the host costs on this machine, each cost next to its floor (the least
    /// the same work costs here, measured in the same run): requests, swap pauses, reloads,
    /// state writes, memory, start-up. Prints a table; writes summary.json, machine.json
    /// and swap-pause.svg into the out directory. Needs the bench's plugins, built with
    /// `.ci/bench-plugins DIR` (see docs/PERFORMANCE.md).
    Bench(BenchArgs),
    /// Answer JSON lines on standard input with JSON lines on standard output: the
    /// out-of-process plugin `bench` compares the host with.
    #[command(hide = true)]
    BenchPeer,
    /// Open a plugin file in this process, check it, create and drop an instance, and print
    /// one report line: what `run` does in a child process before it opens a new file.
    #[command(hide = true)]
    Probe(ProbeArgs),
    /// Run one isolated service's plugin for the host that started this process, over the
    /// sockets it was given as standard input and output.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// `microkernel worker` (internal).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The file to open (the host's private copy).
    #[arg(required_unless_present = "bare")]
    pub file: Option<PathBuf>,
    /// The plugin file it is a copy of, named in messages.
    #[arg(long = "as", value_name = "PATH", required_unless_present = "bare")]
    pub name: Option<PathBuf>,
    /// Answer every request with an empty reply, opening nothing: the floor `bench`
    /// measures an isolated request against.
    #[arg(long)]
    pub bare: bool,
    /// The service it runs, named in its last words if it crashes.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// Its address-space limit (RLIMIT_AS), in bytes.
    #[arg(long, value_name = "BYTES")]
    pub memory_max: Option<u64>,
    /// Confine itself with Landlock before it opens the file.
    #[arg(long)]
    pub landlock: bool,
}

/// `microkernel bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The built plugins: libnoop.so, libecho.so, libkv.so, versions/named-1.0.0.so and
    /// versions/named-2.0.0.so, and startup/ (the services started together).
    #[arg(long, value_name = "DIR")]
    pub plugins: PathBuf,
    /// Where summary.json, machine.json and swap-pause.svg (when the swap pauses are
    /// measured) are written (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Fewer samples of each measure: about 10 s instead of about 30 s on a 2-CPU machine
    /// (the figures are less steady).
    #[arg(long)]
    pub quick: bool,
    /// Where state is written while measuring: a directory on the disk the host's state
    /// will live on (a scratch directory is made in it and removed). The out directory when
    /// not given.
    #[arg(long, value_name = "DIR")]
    pub disk: Option<PathBuf>,
    /// Only these measures (repeat, or separate with commas): requests, memory, swap,
    /// persist, checkpoint, reload, startup, isolation, fleet.
    #[arg(long, value_name = "MEASURE", value_delimiter = ',', value_parser = ["requests", "memory", "swap", "persist", "checkpoint", "reload", "startup", "isolation", "fleet"])]
    pub only: Vec<String>,
    /// Also measure a fleet of hosts: a checkpoint to etcd against a bare put, failover
    /// against the lease TTL. It starts its own etcd (`etcd` on the PATH: Debian's
    /// `etcd-server`) on loopback ports; about a minute more.
    #[arg(long)]
    pub fleet: bool,
    /// One or two samples of each measure: checks that the bench runs (figures meaningless).
    #[arg(long, hide = true, conflicts_with = "quick")]
    pub smoke: bool,
}

/// `microkernel probe` (internal).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The file to open (the host's private copy).
    pub file: PathBuf,
    /// The plugin file it is a copy of, named in messages.
    #[arg(long = "as", value_name = "PATH")]
    pub name: PathBuf,
    /// Where `<service>.conf` is looked for.
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Have the instance import the state read from standard input, exported by this
    /// version, and export it again.
    #[arg(long, value_name = "VERSION")]
    pub import_from: Option<String>,
}

/// Where state keys come from.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The state key file (64 hex digits, mode 0600; see `keygen`). Without it, the key is
    /// read from the environment variable MICROKERNEL_STATE_KEY.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// An earlier key, still accepted for reading state files (repeat for several). Files
    /// are rewritten with the current key at the next save.
    #[arg(long = "old-key-file", value_name = "FILE")]
    pub old_key_files: Vec<PathBuf>,
}

/// The state directory, shared by `run` and `ctl`.
#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Where state files (`<service>.state`) and the control socket live; created with mode
    /// 0700.
    #[arg(
        long = "state-dir",
        value_name = "DIR",
        env = "MICROKERNEL_STATE_DIR",
        default_value = "state"
    )]
    pub dir: PathBuf,
}

/// The control socket's name in the state directory (where it is by default).
pub const CONTROL_SOCKET: &str = "control.sock";

impl StateDirArg {
    /// The control socket's default path.
    pub fn default_socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }
}

/// `microkernel run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plugins directory: every `*.so` in it is loaded. `<service>.conf` next to them is
    /// handed to that service as its configuration.
    #[arg(
        long,
        value_name = "DIR",
        env = "MICROKERNEL_PLUGINS",
        required_unless_present = "config"
    )]
    pub plugins: Option<PathBuf>,
    /// The host's configuration file (TOML): a key for each option of `run` (named as the
    /// option: `checkpoint-interval = "2s"`), where the command line wins; and
    /// `[service.NAME]` sections with `isolate = true` (run the service in a worker process),
    /// `max-restarts`, `restart-window`, `restart-backoff`, `restart-backoff-max`,
    /// `memory-max` and `landlock`. SIGHUP reads the sections again. See README, "Isolated
    /// services".
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration file and the options, print the effective settings, and exit.
    #[arg(long)]
    pub check: bool,
    /// The state directory.
    #[command(flatten)]
    pub state: StateDirArg,
    /// State keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Run without persisting state (no key needed).
    #[arg(long, conflicts_with_all = ["key_file", "old_key_files"])]
    pub no_state: bool,
    /// What to do with a state file that cannot be opened or imported: `refuse` leaves it
    /// untouched and does not start the service; `quarantine` moves it aside and starts the
    /// service fresh.
    #[arg(long, value_enum, default_value_t = OnBadState::Refuse)]
    pub on_bad_state: OnBadState,
    /// How often each service's state is checkpointed (`250ms`, `10s`, `1m`; `0` disables).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// Write the host's PID to this file, and hold a lock on it (removed at exit). A path
    /// that holds anything but a PID file is refused, never overwritten; a PID file no live
    /// host holds is replaced.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// The control socket [default: STATE_DIR/control.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also rescan when a `.so` in the plugins directory changes (debounced).
    #[arg(long)]
    pub watch: bool,
    /// Serve metrics in the OpenMetrics text format (what Prometheus scrapes) at
    /// http://ADDR/metrics (for example
    /// 127.0.0.1:9464; off by default). Anyone who can reach ADDR can read them: service
    /// names, counts and timings, no payloads or state.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Capacity of each service's mailbox.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub mailbox_capacity: u32,
    /// Timeout of requests sent from outside (`ctl send`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_timeout)]
    pub request_timeout: Duration,
    /// How long a thread that expects a message soon polls for it before it sleeps: an
    /// executor after each message, a requester waiting for its reply. Waking a sleeping
    /// thread costs 30 to 70 µs on a virtual machine, a request through the host 4 µs;
    /// polling uses CPU time nothing else wants (it yields the CPU between polls). `0s`
    /// sleeps at once: less CPU, slower exchanges.
    #[arg(long, value_name = "DURATION", default_value = "100us", value_parser = parse_duration)]
    pub spin: Duration,
    /// How long to wait for a service to start, or to reach a checkpoint, a hot replace or a
    /// stop, before reporting it stuck; SIGINT and SIGTERM end the host within it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub operation_timeout: Duration,
    /// How long a plugin file's probe may take: before the host opens a new plugin file, a
    /// child process opens it, checks it and creates an instance; a file whose probe crashes
    /// or takes longer is refused.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub probe_timeout: Duration,
    /// Where the private copies of plugin files are opened from [default: the temporary
    /// directory]. Must allow executable mappings (not `noexec`).
    #[arg(long, value_name = "DIR")]
    pub shadow_dir: Option<PathBuf>,
    /// Load only the plugin files whose SHA-256 is listed in FILE (`sha256sum` output;
    /// read again at every rescan). Others are refused, naming their digest.
    #[arg(long = "allow-sha256", value_name = "FILE")]
    pub allow_sha256: Option<PathBuf>,
    /// Load plugins even from a plugins directory, or files, that another user can write
    /// or owns, and use such a state directory (by default they are refused, as sshd's
    /// StrictModes does).
    #[arg(long)]
    pub allow_insecure_permissions: bool,
    /// Joining a fleet of hosts.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// How long a control client may take to read an answer before its connection is
    /// closed (for tests on slow machines).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_timeout, hide = true)]
    pub control_answer_timeout: Duration,
}

/// A fleet of hosts (see README, "A fleet of hosts").
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Join a fleet: keep service state in this etcd (`etcd://HOST:PORT[,HOST:PORT...]`,
    /// `etcds://` for TLS), and run only the services this host owns (the others run on
    /// other hosts of the fleet, which take over this host's services if it dies). Without
    /// it, state stays in the state directory.
    #[arg(long, value_name = "URL")]
    pub cluster: Option<String>,
    /// This host's name in the fleet, unique among its live hosts [default: the machine's
    /// host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// How long a host that stopped answering keeps its services before the others take
    /// them (whole seconds, at least 2s; longer than etcd takes to restart). A host that
    /// cannot renew its lease in time stops serving on its own. [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// The fleet's keys in etcd start with this (fleets sharing one etcd need their own).
    /// [default: /microkernel]
    #[arg(long, value_name = "PREFIX")]
    pub cluster_prefix: Option<String>,
    /// The CA certificate (PEM) that signed etcd's certificates.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// This host's client certificate for etcd (PEM; with --etcd-key-file).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The key of --etcd-cert-file (PEM).
    #[arg(long, value_name = "FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (with --etcd-password-file).
    #[arg(long, value_name = "USER")]
    pub etcd_user: Option<String>,
    /// The file holding the etcd user's password (a password on the command line would
    /// show in `ps`).
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

/// `microkernel ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket [default: STATE_DIR/control.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The state directory of the host to talk to: its control socket is there, unless
    /// --socket says otherwise.
    #[arg(
        long = "state-dir",
        global = true,
        value_name = "DIR",
        env = "MICROKERNEL_STATE_DIR",
        default_value = "state"
    )]
    pub state_dir: PathBuf,
    /// How long to wait for the host's answer before giving up (exit 2).
    #[arg(long, global = true, value_name = "DURATION", default_value = "5m", value_parser = parse_wait)]
    pub wait: Duration,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The control commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List the services: name, version, status, mode (in-process or isolated), owner node
    /// (in a fleet), library digest, loaded since, swaps, earlier libraries still loaded (pinned), last error;
    /// then isolated services' workers (PID, restarts, crashes, last crash), rejected plugin
    /// files, services with no plugin file, and plugin files that do not load.
    List {
        /// Print one JSON object instead of a table: `services`, `broken`,
        /// `rejected_elsewhere`, `orphaned`.
        #[arg(long)]
        json: bool,
    },
    /// Send a request to a service and print the reply's data; exits 1 with the reply's code
    /// and message when the reply is an error.
    Send {
        /// The service (or `kernel`).
        service: String,
        /// The payload (JSON by convention).
        payload: String,
        /// The request kind.
        #[arg(long, default_value = "request")]
        kind: String,
        /// How long to wait for the reply [default: the host's --request-timeout].
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        timeout: Option<Duration>,
    },
    /// Rescan the plugins directory now (all services, or only one); exits 1 if anything
    /// failed or a plugin file stays rejected.
    Reload {
        /// Only this service.
        service: Option<String>,
        /// Try the plugin files rejected earlier again (they are otherwise skipped until
        /// their content or their service's configuration changes).
        #[arg(long)]
        retry: bool,
    },
    /// Checkpoint every running service now.
    Checkpoint,
    /// Stop a service (and the services that depend on it), saving its state.
    Stop {
        /// The service.
        service: String,
    },
    /// Start a stopped service.
    Start {
        /// The service.
        service: String,
    },
    /// The fleet this host is one of (`run --cluster`): its nodes and their services, the
    /// services no node owns, and this host's lease.
    Fleet {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `microkernel inspect-state`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// State keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The state file.
    pub state_file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `250ms`, `10s`, `1m`, `1h 30m`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (write durations like 250ms, 10s, 1m, or 0)"))
}

/// A wait for the host's answer: a duration, not zero.
fn parse_wait(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        wait if wait.is_zero() => Err("a wait must be longer than 0 (for example 10s)".into()),
        wait => Ok(wait),
    }
}

/// A timeout: a duration, not zero (a zero timeout would make every wait on a plugin fail,
/// and every plugin file look at fault).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        timeout if timeout.is_zero() => {
            Err("a timeout must be longer than 0 (for example 10s)".into())
        }
        timeout => Ok(timeout),
    }
}

impl CtlArgs {
    /// The socket to connect to.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(CONTROL_SOCKET))
    }
}

/// `arg` as a POSIX shell reads it back: as it is when it holds only characters no shell
/// treats specially, otherwise in single quotes. For commands printed to be copied.
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn printed_arguments_survive_a_shell() {
        assert_eq!(shell_quote("--state-dir"), "--state-dir");
        assert_eq!(shell_quote("/tmp/x/state"), "/tmp/x/state");
        assert_eq!(
            shell_quote(r#"{"op":"put","key":"a","value":1}"#),
            r#"'{"op":"put","key":"a","value":1}'"#
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
