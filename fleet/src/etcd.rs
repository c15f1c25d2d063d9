//! The connection to etcd: a client on a tokio runtime of its own (one worker thread), and a
//! blocking call with a deadline for the kernel's plain threads.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::error::FleetError;

/// How to reach etcd: `--cluster`, and the TLS and authentication of a real deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// `host:port` of each member.
    pub members: Vec<String>,
    /// Whether to speak TLS (`etcds://`, or any TLS file given).
    pub tls: bool,
    /// The CA that signed the members' certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// This host's client certificate and key (PEM), for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// etcd's role-based authentication: the user, and the file its password is in.
    pub user: Option<String>,
    /// The file holding the user's password (not the password: it would show in `ps`).
    pub password_file: Option<PathBuf>,
}

impl Endpoints {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]` (`etcds://` for TLS).
    pub fn parse(text: &str) -> Result<Endpoints, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("etcds://") {
            (true, rest)
        } else {
            return Err(format!(
                "`{text}` is not an etcd address: expected etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
            ));
        };
        let members: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        if members.is_empty() {
            return Err(format!("`{text}` names no etcd member"));
        }
        for member in &members {
            match member.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() => {
                    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                        return Err(format!(
                            "etcd member `{member}`: `{port}` is not a port (1 to 65535)"
                        ));
                    }
                }
                _ => return Err(format!("etcd member `{member}` is not HOST:PORT")),
            }
        }
        Ok(Endpoints {
            members,
            tls,
            ..Endpoints::default()
        })
    }

    /// The members as `etcd://a:1,b:2`, for messages.
    pub fn describe(&self) -> String {
        let scheme = if self.uses_tls() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.members.join(","))
    }

    fn uses_tls(&self) -> bool {
        self.tls || self.ca_file.is_some() || self.cert_file.is_some()
    }

    fn urls(&self) -> Vec<String> {
        let scheme = if self.uses_tls() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://{m}"))
            .collect()
    }

    fn options(&self) -> Result<ConnectOptions, FleetError> {
        let read = |path: &Path, what: &'static str| {
            host::bounded::read(path, 1 << 20)
                .map(|data| data.bytes)
                .map_err(|source| FleetError::File {
                    path: path.to_owned(),
                    what,
                    source,
                })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        if self.uses_tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "etcd CA certificate")?));
            }
            match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "etcd client certificate")?,
                        read(key, "etcd client key")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(FleetError::Config(
                        "an etcd client certificate needs its key, and a key its certificate"
                            .into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        match (&self.user, &self.password_file) {
            (Some(user), Some(file)) => {
                // As the state key's file: a secret others can read is refused.
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(file)
                    .map_err(|source| FleetError::File {
                        path: file.clone(),
                        what: "etcd password",
                        source,
                    })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(FleetError::Config(format!(
                        "etcd password file {} can be read or written by other users (mode {:04o}): `chmod 600` it",
                        file.display(),
                        mode & 0o7777
                    )));
                }
                let password = read(file, "etcd password")?;
                let password = String::from_utf8(password)
                    .map_err(|_| {
                        FleetError::Config(format!(
                            "etcd password file {} is not UTF-8",
                            file.display()
                        ))
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                // etcd's tokens expire: fetched again when refused, not only at connect.
                options = options
                    .with_user(user.clone(), password)
                    .with_auto_token_refresh(true);
            }
            (None, None) => {}
            _ => {
                return Err(FleetError::Config(
                    "an etcd user needs a password file, and a password file a user".into(),
                ))
            }
        }
        Ok(options)
    }
}

/// A client of etcd with a runtime of its own: every call runs there, and the calling
/// (plain) thread waits for it, at most the call timeout.
pub struct Etcd {
    runtime: tokio::runtime::Runtime,
    client: Client,
    endpoints: Endpoints,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints.describe())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects to `endpoints`; each call then gives up after `timeout`.
    pub fn connect(endpoints: &Endpoints, timeout: Duration) -> Result<Etcd, FleetError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("etcd")
            // Known to the host, as every thread it makes (a thread it does not know keeps
            // plugin libraries loaded: see `host::loader::threads`).
            .on_thread_start(host::loader::threads::adopt_current_thread)
            .enable_all()
            .build()
            .map_err(|source| FleetError::Runtime { source })?;
        let options = endpoints.options()?;
        let urls = endpoints.urls();
        let connect = async move { Client::connect(urls, Some(options)).await };
        let client = wait(&runtime, endpoints, "connecting", timeout, connect)?;
        Ok(Etcd {
            runtime,
            client,
            endpoints: endpoints.clone(),
            timeout,
        })
    }

    /// The members, for messages.
    pub fn endpoints(&self) -> String {
        self.endpoints.describe()
    }

    /// A handle on the client, for a call or a task.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `call` (made with a handle on the client) on the runtime and waits for it.
    pub fn call<T, F>(
        &self,
        op: &'static str,
        call: impl FnOnce(Client) -> F,
    ) -> Result<T, FleetError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let future = call(self.client.clone());
        wait(&self.runtime, &self.endpoints, op, self.timeout, future)
    }

    /// Runs `task` on the runtime, detached (the lease's keepalive).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(task);
    }
}

/// Runs `future` on `runtime` and waits for it, at most `timeout`; its failure named after
/// `endpoints` and `op`.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    endpoints: &Endpoints,
    op: &'static str,
    timeout: Duration,
    future: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, FleetError> {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let outcome = tokio::time::timeout(timeout, future).await;
        let _ = tx.send(outcome);
    });
    match rx.recv() {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(source))) => Err(FleetError::Etcd {
            endpoints: endpoints.describe(),
            op,
            source,
        }),
        // Timed out, or the runtime is shutting down (the task was dropped).
        Ok(Err(_)) | Err(_) => Err(FleetError::TimedOut {
            endpoints: endpoints.describe(),
            op,
            timeout,
        }),
    }
}
