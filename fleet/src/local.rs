//! A single-member etcd on loopback ports of its own, with its data in a directory of the
//! caller's: for the test suite and `microkernel bench --fleet`, which measure and test
//! against the real server (Debian's `etcd-server`), never a mock.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    error::FleetError,
    etcd::{Endpoints, Etcd},
};

/// One etcd member, killed when dropped.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
    /// Its clients speak TLS: the CA that signed its certificate, its certificate and key.
    tls: Option<Tls>,
}

/// The files of an etcd whose clients speak TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed `cert` (PEM).
    pub ca: PathBuf,
    /// The server's certificate (PEM), for 127.0.0.1.
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts `etcd` (from `PATH`) with its data and log in `dir`, and waits until it
    /// answers.
    pub fn start(dir: &Path) -> anyhow::Result<LocalEtcd> {
        LocalEtcd::start_with(dir, None)
    }

    /// The same, its clients speaking TLS with `tls`'s certificate.
    pub fn start_with(dir: &Path, tls: Option<Tls>) -> anyhow::Result<LocalEtcd> {
        let mut etcd = LocalEtcd {
            child: None,
            dir: dir.to_owned(),
            client: free_port()?,
            peer: free_port()?,
            tls,
        };
        etcd.run()?;
        Ok(etcd)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log"))
            .with_context(|| format!("creating etcd's log in {}", self.dir.display()))?;
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
        }
        let child = command
            .args(["--name", "local"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("local={peer}")])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's package `etcd-server`)")?;
        self.child = Some(child);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last: Option<FleetError> = None;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "etcd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.client)).is_ok() {
                let answered =
                    Etcd::connect(&self.endpoints(), Duration::from_secs(1)).and_then(|etcd| {
                        etcd.call("asking its status", |mut c| async move { c.status().await })
                    });
                match answered {
                    Ok(_) => return Ok(()),
                    Err(error) => last = Some(error),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!(
            "etcd did not answer within 30 s{}",
            last.map(|e| format!(": {}", host::error_chain(&e)))
                .unwrap_or_default()
        )
    }

    /// `etcd://127.0.0.1:PORT` (`etcds://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client)
    }

    /// Its endpoints (with its CA, when its clients speak TLS).
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            members: vec![format!("127.0.0.1:{}", self.client)],
            tls: self.tls.is_some(),
            ca_file: self.tls.as_ref().map(|tls| tls.ca.clone()),
            ..Endpoints::default()
        }
    }

    /// Kills it (SIGKILL); its data stays for [`LocalEtcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.run()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
