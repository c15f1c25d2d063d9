//! A bare exchange between two processes over the worker's transport, with the worker's
//! waiting policy and nothing else: the floor `microkernel bench` measures an isolated
//! request against.

use std::{
    io,
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::protocol::{Conn, FromWorker, ToWorker, WireReply};

/// The host's end of a bare peer: `PROGRAM worker --bare`, which answers every request
/// frame with an empty reply frame.
#[derive(Debug)]
pub struct BarePeer {
    child: Child,
    conn: Conn,
    spin: Duration,
}

impl BarePeer {
    /// Starts the peer; this end polls for `spin` before it sleeps, as an executor does.
    pub fn spawn(program: &Path, spin: Duration) -> io::Result<BarePeer> {
        let (ours, theirs) = UnixStream::pair()?;
        let (_side_ours, side_theirs) = UnixStream::pair()?;
        let child = Command::new(program)
            .args(["worker", "--bare"])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(side_theirs)))
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(BarePeer {
            child,
            conn: Conn::new(ours)?,
            spin,
        })
    }

    /// One request frame out, one reply frame back.
    pub fn round_trip(&mut self, payload: &[u8]) -> io::Result<()> {
        let request = ToWorker::Handle {
            from: "external",
            kind: "noop",
            payload,
        };
        self.conn.send(&request, None).map_err(io::Error::other)?;
        match self.conn.recv::<FromWorker>(self.spin, None) {
            Ok(FromWorker::Replied(_)) => Ok(()),
            Ok(other) => Err(io::Error::other(format!("the bare peer sent {other:?}"))),
            Err(error) => Err(io::Error::other(error)),
        }
    }
}

impl Drop for BarePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `microkernel worker --bare`: answers each request frame on standard input with an empty
/// reply frame, polling as a worker does, until its socket closes.
pub fn run_bare_child() -> ! {
    let served = (|| -> io::Result<()> {
        let mut conn = Conn::new(UnixStream::from(nix::unistd::dup(io::stdin())?))?;
        loop {
            match conn.recv::<ToWorker>(super::child::SPIN, None) {
                Ok(ToWorker::Handle { .. }) => {}
                Ok(_) => continue,
                Err(_) => return Ok(()),
            }
            let reply = FromWorker::Replied(WireReply {
                code: 0,
                message: "",
                data: &[],
            });
            if conn.send(&reply, None).is_err() {
                return Ok(());
            }
        }
    })();
    crate::loader::exit_without_destructors(i32::from(served.is_err()))
}
