//! A real etcd for the fleet's tests: Debian's `etcd-server` (installed by `.ci/run`),
//! started on loopback ports of its own with its data in a temporary directory
//! (`fleet::local::LocalEtcd`, which the bench uses too).

use fleet::{local::LocalEtcd, Endpoints};

/// One etcd member, killed when dropped.
pub struct EtcdServer {
    etcd: LocalEtcd,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts one, and waits until it answers.
    pub fn start() -> EtcdServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let etcd = LocalEtcd::start(dir.path())
            .expect("etcd runs (Debian's etcd-server: `.ci/run` installs it)");
        EtcdServer { etcd, _dir: dir }
    }

    /// `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.etcd.url()
    }

    /// The endpoints of a fleet using it.
    pub fn endpoints(&self) -> Endpoints {
        self.etcd.endpoints()
    }

    /// Runs `etcdctl ARGS` against it, as an operator would, and returns what it printed;
    /// panics, with what it said, when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints={}",
                self.url().replace("etcd://", "http://")
            ))
            .args(args)
            .output()
            .expect("etcdctl runs (Debian's etcd-client: `.ci/run` installs it)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills it (SIGKILL); its data stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        self.etcd.kill();
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.etcd.restart().expect("etcd starts again");
    }
}
