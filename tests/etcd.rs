//! A real etcd for the fleet's tests: Debian's `etcd-server` (installed by `.ci/run`),
//! started on loopback ports of its own with its data in a temporary directory.

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fleet::Endpoints;

/// One etcd member, killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl EtcdServer {
    /// Starts one, and waits until it answers.
    pub fn start() -> EtcdServer {
        let mut server = EtcdServer {
            child: None,
            dir: tempfile::tempdir().expect("a temporary directory"),
            client: free_port(),
            peer: free_port(),
        };
        server.run();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd's log");
        let child = Command::new("etcd")
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.data())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (Debian's etcd-server: `.ci/run` installs it)");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://127.0.0.1:{}/health", self.client);
        loop {
            let healthy = ureq::get(&url)
                .timeout(Duration::from_secs(1))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .is_some_and(|body| body.contains("true"));
            if healthy {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "etcd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client)
    }

    /// The endpoints of a fleet using it.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints::parse(&self.url()).expect("a valid address")
    }

    /// Kills it (SIGKILL); its data stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Gone for its clients: nothing listens on the port.
        assert!(TcpStream::connect(("127.0.0.1", self.client)).is_err());
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
