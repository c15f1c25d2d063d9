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
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts `etcd` (from `PATH`) with its data and log in `dir`, and waits until it
    /// answers.
    pub fn start(dir: &Path) -> anyhow::Result<LocalEtcd> {
        let mut etcd = LocalEtcd {
            child: None,
            dir: dir.to_owned(),
            client: free_port()?,
            peer: free_port()?,
        };
        etcd.run()?;
        Ok(etcd)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log"))
            .with_context(|| format!("creating etcd's log in {}", self.dir.display()))?;
        let child = Command::new("etcd")
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

    /// `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client)
    }

    /// Its endpoints.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            members: vec![format!("127.0.0.1:{}", self.client)],
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
