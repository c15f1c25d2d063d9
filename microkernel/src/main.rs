//! `microkernel`: the plugin host's command line. See `microkernel --help`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use host::state::{self, StateKey};
use microkernel::{
    cli::{Cli, Command, CtlArgs, CtlCommand, InspectArgs},
    control::{self, Request, Response},
    daemon,
};
use tracing_subscriber::EnvFilter;

/// Before `main`, before any Rust code: SIGHUP, SIGINT and SIGTERM are held (pending, not
/// fatal) from the program's first constructor on, until `run` has installed its handlers;
/// other commands let them through once their arguments are parsed. (What runs before this
/// is the dynamic loader, for a fraction of a millisecond.)
#[used]
#[link_section = ".init_array"]
static HOLD_SIGNALS: extern "C" fn() = hold_signals;

extern "C" fn hold_signals() {
    daemon::hold_signals();
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    // The configuration file fills in what the command line did not give, logging
    // included; a bad file is said before anything starts.
    let mut config_file = None;
    if let (Command::Run(args), Some(run)) = (&mut cli.command, matches.subcommand_matches("run")) {
        if let Some(path) = args.config.clone() {
            // Whoever can write the file can choose the plugins and turn isolation off: it
            // is checked as the plugins directory is (only the command line can opt out).
            let trust = host::trust::Trust {
                strict_modes: !args.allow_insecure_permissions,
                allow_list: None,
            };
            if let Err(error) = trust.check("configuration file", &path) {
                eprintln!("microkernel: {}", host::error_chain(&error));
                return ExitCode::from(2);
            }
            let file = match microkernel::config::read(&path) {
                Ok(file) => file,
                Err(error) => {
                    eprintln!("microkernel: {error:#}");
                    return ExitCode::from(2);
                }
            };
            let given = microkernel::config::given_in(run);
            microkernel::config::merge(args, &file, &given);
            let global = microkernel::config::given_in(&matches);
            microkernel::config::merge_logging(
                &mut cli.log_level,
                &mut cli.log_format,
                &file,
                &global,
            );
            config_file = Some((path, file));
        }
        let isolation = config_file
            .as_ref()
            .map(|(_, file)| microkernel::config::isolation(file, args.operation_timeout))
            .unwrap_or_default();
        let path = config_file.as_ref().map(|(path, _)| path.as_path());
        if let Err(error) = microkernel::config::validate(args, &isolation, path) {
            eprintln!("microkernel: {error:#}");
            return ExitCode::from(2);
        }
        if args.check {
            daemon::release_signals();
            let logging = (cli.log_level.clone(), cli.log_format);
            return check(args, logging, &isolation);
        }
    }
    // A worker keeps SIGHUP, SIGINT and SIGTERM held: the host ends it when it stops its
    // service (a Ctrl-C, or systemd's SIGTERM to the whole unit, must not kill a worker
    // before the host has saved its state).
    if !matches!(cli.command, Command::Run(_) | Command::Worker(_)) {
        daemon::release_signals();
    }
    // The bench's own kernels would log every start and stop it makes.
    let default_level = match cli.command {
        Command::Bench(_) => "warn",
        _ => "info",
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    if let Err(error) = microkernel::logs::check_level(level) {
        eprintln!("microkernel: invalid --log-level {level:?}: {error}");
        std::process::exit(2);
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|e| {
            eprintln!("microkernel: invalid --log-level {level:?}: {e}");
            std::process::exit(2);
        });
    let daemon = matches!(cli.command, Command::Run(_));
    microkernel::logs::init(filter, cli.log_format, daemon);
    let outcome = execute(cli.command, config_file);
    if !daemon && outcome.as_ref().is_err_and(reader_went_away) {
        // The reader of our output went away (`microkernel ctl list | head -3`): end
        // quietly, as command-line tools do.
        return ExitCode::SUCCESS;
    }
    if daemon {
        // The log's queue first, so that the last line is the outcome's.
        let dropped = microkernel::logs::dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines were dropped: their reader did not keep up"
            );
        }
        microkernel::logs::flush();
    }
    if let Err(error) = &outcome {
        // Never a panic: standard error may be a file on a full disk.
        let _ = writeln!(std::io::stderr(), "microkernel: {error:#}");
    }
    if daemon {
        // Every state is saved: end now, without running the plugins' library destructors
        // (plugin code, which could hang or crash at this point).
        let _ = std::io::stdout().flush();
        host::loader::exit_without_destructors(if outcome.is_ok() { 0 } else { 2 });
    }
    outcome.unwrap_or(ExitCode::from(2))
}

/// A section of `ctl list`'s table: its title, then its lines, indented; nothing when it
/// has none.
fn section(
    out: &mut impl Write,
    title: &str,
    lines: impl IntoIterator<Item = String>,
) -> std::io::Result<()> {
    let mut lines = lines.into_iter().peekable();
    if lines.peek().is_some() {
        writeln!(out, "\n{title}:")?;
        for line in lines {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

/// Whether `error` is a write to a pipe whose reader is gone.
fn reader_went_away(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `run --check`: the effective settings, or why they are wrong: what `run` would refuse
/// before it starts anything (the plugins directory, the key, the log filter).
fn check(
    args: &microkernel::cli::RunArgs,
    (log_level, log_format): (Option<String>, microkernel::cli::LogFormat),
    isolation: &std::collections::BTreeMap<String, host::worker::Isolation>,
) -> ExitCode {
    let mut problems = Vec::new();
    match &args.plugins {
        None => problems.push(
            "no plugins directory: give --plugins, or `plugins` in the configuration file"
                .to_owned(),
        ),
        Some(dir) if !dir.is_dir() => problems.push(format!(
            "plugins directory {} does not exist or is not a directory",
            dir.display()
        )),
        Some(_) => {}
    }
    if !args.no_state {
        match &args.keys.key_file {
            Some(key) if !key.is_file() => {
                problems.push(format!("key file {} does not exist", key.display()))
            }
            None if std::env::var_os(daemon::KEY_ENV).is_none() => problems.push(format!(
                "no state key: give `key-file`, set {}, or `no-state = true`",
                daemon::KEY_ENV
            )),
            _ => {}
        }
    }
    let level = log_level.as_deref().unwrap_or("info");
    if let Err(error) = microkernel::logs::check_level(level) {
        problems.push(format!("log-level {level:?} is not a log filter: {error}"));
    }
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("microkernel: {problem}");
        }
        return ExitCode::from(2);
    }
    let mut text = microkernel::config::effective(args, isolation);
    text.insert_str(
        0,
        &format!(
            "log-level = {level:?}\nlog-format = \"{}\"\n",
            match log_format {
                microkernel::cli::LogFormat::Text => "text",
                microkernel::cli::LogFormat::Json => "json",
            }
        ),
    );
    match write!(std::io::stdout(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(2),
    }
}

fn execute(
    command: Command,
    config_file: Option<(std::path::PathBuf, microkernel::config::FileConfig)>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => daemon::run(args, config_file).map(|()| ExitCode::SUCCESS),
        Command::Keygen { out } => {
            let key = StateKey::write_new(&out)?;
            writeln!(
                std::io::stdout(),
                "wrote a new state key to {} (id {}, mode 0600)",
                out.display(),
                key.id_hex()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { pid_file } => {
            let pid = daemon::signal_reload(&pid_file)?;
            writeln!(std::io::stdout(), "sent SIGHUP to {pid}")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl(args) => ctl(args),
        Command::InspectState(args) => inspect(args),
        Command::Bench(args) => {
            let effort = match (args.quick, args.smoke) {
                (_, true) => microkernel::bench::Effort::Smoke,
                (true, _) => microkernel::bench::Effort::Quick,
                _ => microkernel::bench::Effort::Full,
            };
            let rows = microkernel::bench::run(&microkernel::bench::Options {
                plugins: args.plugins,
                out: args.out,
                disk: args.disk,
                effort,
                only: args.only,
                fleet: args.fleet,
            })?;
            // Goals missed are in the table and the summary: the bench itself succeeded.
            drop(rows);
            Ok(ExitCode::SUCCESS)
        }
        Command::NewPlugin {
            name,
            path,
            plugin_api,
        } => {
            let dir = path.unwrap_or_else(|| PathBuf::from(&name));
            let api = match plugin_api {
                Some(path) => microkernel::scaffold::Api::Path(path),
                None => microkernel::scaffold::Api::built_from()?,
            };
            microkernel::scaffold::new_plugin(&name, &dir, &api)?;
            let lib = name.replace('-', "_");
            writeln!(
                std::io::stdout(),
                "wrote the plugin `{name}` to {shown}\n\n    cd {quoted}\n    cargo test\n    cargo build --release   # target/release/lib{lib}.so\n\nand see README.md there to drop it into a host",
                shown = dir.display(),
                quoted = microkernel::cli::shell_quote(&dir.to_string_lossy())
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchPeer => {
            microkernel::bench::serve_json_lines()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(args) => {
            let code = host::loader::run_probe_child(
                &args.file,
                &args.name,
                args.config_dir.as_deref(),
                args.import_from.as_deref(),
            );
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(2)))
        }
        Command::Worker(args) => match (args.bare, args.file, args.name) {
            (false, Some(file), Some(name)) => host::worker::run_worker_child(
                &file,
                &name,
                args.service.as_deref(),
                &host::worker::Limits {
                    memory_max: args.memory_max,
                    landlock: args.landlock,
                },
            ),
            _ => host::worker::run_bare_child(),
        },
    }
}

fn ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let socket = args.socket_path();
    let request = match &args.command {
        CtlCommand::List { .. } => Request::List,
        CtlCommand::Send {
            service,
            payload,
            kind,
            timeout,
        } => Request::Send {
            service: service.clone(),
            kind: kind.clone(),
            payload: hex::encode(payload),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        },
        CtlCommand::Reload { service, retry } => Request::Reload {
            service: service.clone(),
            retry: *retry,
        },
        CtlCommand::Checkpoint => Request::Checkpoint,
        CtlCommand::Stop { service } => Request::Stop {
            service: service.clone(),
        },
        CtlCommand::Start { service } => Request::Start {
            service: service.clone(),
        },
        CtlCommand::Fleet { .. } => Request::Fleet,
    };
    let response = control::call(&socket, &request, args.wait)?;
    let mut out = std::io::stdout().lock();
    match response {
        Response::Services {
            services,
            broken,
            rejected_elsewhere,
            orphaned,
        } => {
            if matches!(args.command, CtlCommand::List { json: true }) {
                // Everything the table says, so that a monitor reading it misses nothing.
                let pairs = |pairs: Vec<(String, String)>, key: &str| -> Vec<serde_json::Value> {
                    pairs
                        .into_iter()
                        .map(|(service, line)| serde_json::json!({ "service": service, key: line }))
                        .collect()
                };
                let all = serde_json::json!({
                    "services": services,
                    "broken": broken,
                    "rejected_elsewhere": pairs(rejected_elsewhere, "rejected"),
                    "orphaned": pairs(orphaned, "why"),
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
            } else {
                writeln!(
                    out,
                    "{:<16} {:<12} {:<10} {:<10} {:<12} {:<20} {:>5} {:>6}  LAST ERROR",
                    "NAME",
                    "VERSION",
                    "STATUS",
                    "MODE",
                    "SHA256",
                    "LOADED SINCE",
                    "SWAPS",
                    "PINNED"
                )?;
                let mut pinned = Vec::new();
                let mut workers = Vec::new();
                let mut owners = Vec::new();
                let mut rejected = rejected_elsewhere;
                for s in services {
                    pinned.extend(s.pinned.iter().map(|p| format!("{}: {p}", s.name)));
                    rejected.extend(s.rejected.iter().map(|r| (s.name.clone(), r.clone())));
                    if let Some(worker) = &s.worker {
                        workers.push(format!("{}: {}", s.name, worker.describe()));
                    }
                    if let Some(owner) = &s.owner {
                        owners.push(format!("{}: node {owner}", s.name));
                    }
                    writeln!(
                        out,
                        "{:<16} {:<12} {:<10} {:<10} {:<12} {:<20} {:>5} {:>6}  {}",
                        s.name,
                        s.version,
                        s.status.to_string(),
                        s.mode,
                        s.sha256.get(..12).unwrap_or(&s.sha256),
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.loaded_since)
                        )
                        .to_string(),
                        s.swaps,
                        s.pinned.len(),
                        s.last_error.unwrap_or_default()
                    )?;
                }
                section(
                    &mut out,
                    "owners in the fleet (a service runs on its owner only)",
                    owners,
                )?;
                section(&mut out, "worker processes of isolated services", workers)?;
                section(
                    &mut out,
                    "earlier libraries kept loaded (plugin code may still run in them)",
                    pinned,
                )?;
                section(
                    &mut out,
                    "rejected plugin files (not chosen until their content or configuration changes; `ctl reload --retry` tries them again)",
                    rejected.into_iter().map(|(service, line)| format!("{service}: {line}")),
                )?;
                section(
                    &mut out,
                    "services with no plugin file (they will not start after a restart)",
                    orphaned.into_iter().map(|(_, why)| why),
                )?;
                section(
                    &mut out,
                    "plugin files that do not load (read again when they change)",
                    broken,
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Reply {
            code,
            message,
            data,
        } => {
            if code == plugin_api::codes::OK {
                let mut data = hex::decode(data).context("reply data")?;
                if !data.ends_with(b"\n") {
                    data.push(b'\n');
                }
                out.write_all(&data)?;
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error {code}: {message}");
                Ok(ExitCode::FAILURE)
            }
        }
        Response::Done { lines, failed } => {
            for line in lines {
                writeln!(out, "{line}")?;
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Response::Fleet(view) => {
            let control::FleetView {
                node,
                etcd,
                lease,
                lease_ttl_ms,
                valid_for_ms,
                refused_writes,
                nodes,
                unowned,
            } = *view;
            if matches!(args.command, CtlCommand::Fleet { json: true }) {
                let all = serde_json::json!({
                    "node": node,
                    "etcd": etcd,
                    "lease": lease,
                    "lease_ttl_ms": lease_ttl_ms,
                    "valid_for_ms": valid_for_ms,
                    "refused_writes": refused_writes,
                    "nodes": nodes,
                    "unowned": unowned,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
            } else {
                let lease = match (lease, valid_for_ms) {
                    (Some(lease), Some(valid)) => format!(
                        "lease {lease}, TTL {}, certainly valid for {}",
                        humantime::format_duration(std::time::Duration::from_millis(lease_ttl_ms)),
                        humantime::format_duration(std::time::Duration::from_millis(valid))
                    ),
                    _ => "no lease: this host serves nothing until it has one again".into(),
                };
                writeln!(out, "this host: node {node} on {etcd}; {lease}")?;
                if refused_writes > 0 {
                    writeln!(out, "state writes refused because this host no longer owned the service: {refused_writes}")?;
                }
                writeln!(
                    out,
                    "{:<24} {:>8} {:<16} {:<20}  SERVICES",
                    "NODE", "PID", "LEASE", "JOINED"
                )?;
                for n in nodes {
                    writeln!(
                        out,
                        "{:<24} {:>8} {:<16} {:<20}  {}",
                        n.node,
                        n.pid,
                        n.lease,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(n.since)
                        )
                        .to_string(),
                        n.services.join(", ")
                    )?;
                }
                section(&mut out, "services no node owns (yet)", unowned)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => anyhow::bail!("{message}"),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let keys = daemon::key_ring(&args.keys)?;
    let (header, content) = state::inspect(&keys, &args.state_file)?;
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&content).ok();
    if args.json {
        let content = parsed.unwrap_or_else(|| serde_json::json!({ "hex": hex::encode(&content) }));
        let value = serde_json::json!({
            "file": args.state_file,
            "header": header,
            "content": content,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        writeln!(out, "file:        {}", args.state_file.display())?;
        writeln!(out, "format:      {}", header.format)?;
        writeln!(out, "service:     {}", header.service)?;
        writeln!(out, "exported by: version {}", header.exported_by)?;
        writeln!(out, "key id:      {}", header.key_id)?;
        writeln!(out, "nonce:       {}", header.nonce)?;
        writeln!(
            out,
            "sealed:      {} bytes (state {} bytes)",
            header.sealed_len,
            content.len()
        )?;
        writeln!(out, "content:")?;
        match parsed {
            Some(value) => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
            None => writeln!(out, "{}", hex::encode(&content))?,
        }
    }
    Ok(ExitCode::SUCCESS)
}
