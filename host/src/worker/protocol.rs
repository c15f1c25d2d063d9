//! The worker protocol: postcard-encoded messages in length-prefixed frames on a socket
//! pair, and the waiting policy of both ends (poll for `spin`, then sleep in `poll(2)`).
//!
//! A frame is a 4-byte little-endian length and that many bytes of one message. Messages
//! borrow their strings and bytes from the frame they were read from: a request's payload
//! or a state is copied once, out of the socket, and never again on the way in.
//!
//! Two sockets join host and worker:
//! - the **call** socket carries the host's calls (create, start, stop, handle, on_event,
//!   export, import, exit) and, while a call runs, the callbacks the plugin makes on the
//!   thread that serves it (log, request, emit) and their answers. One side speaks at a
//!   time: the host waits for the outcome, answering callbacks as they come.
//! - the **side** socket carries the callbacks of the plugin's other threads (a runtime, a
//!   timer), whenever they come, and their answers; a host thread serves it, and its end of
//!   file is how the host learns that an idle worker died.

use std::{
    io::{self, Read, Write},
    os::{fd::AsFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The largest frame either side accepts: a state of the largest size saved, and room for
/// its envelope. A length above it is a protocol violation (a worker whose memory is
/// corrupt), never an allocation.
pub(crate) const MAX_FRAME: usize = crate::state::store::MAX_STATE_SIZE as usize + (1 << 20);

/// What the host sends a worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker<'a> {
    /// Open the plugin file and create the one instance, with this configuration text.
    Create {
        config: Option<&'a str>,
    },
    Start,
    Stop,
    Handle {
        from: &'a str,
        kind: &'a str,
        #[serde(borrow)]
        payload: &'a [u8],
    },
    Event {
        from: &'a str,
        kind: &'a str,
        #[serde(borrow)]
        payload: &'a [u8],
    },
    Export,
    Import {
        from_version: &'a str,
        #[serde(borrow)]
        state: &'a [u8],
    },
    /// Drop the instance and exit.
    Exit,
    /// The answer to a [`FromWorker::Request`].
    Replied(WireReply<'a>),
    /// The answer to a [`FromWorker::Emit`].
    Emitted(Result<(), &'a str>),
}

/// What a worker sends the host.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker<'a> {
    /// The worker runs and is about to open the file: a worker that ends before this line
    /// never got to the file (the host's trouble, not the file's). With what confines it,
    /// when it was asked to confine itself (Landlock: enforced, partly, or not).
    Ready { confined: Option<&'a str> },
    /// The file is open (or why not): the manifest it declares.
    Opened(Result<WireManifest<'a>, &'a str>),
    /// The instance exists, or why not.
    Created(Result<(), &'a str>),
    /// A call without a value ended.
    Done(Result<(), &'a str>),
    /// `handle` answered.
    Replied(WireReply<'a>),
    /// `export_state` answered.
    Exported(#[serde(borrow)] Result<&'a [u8], &'a str>),
    /// Callbacks.
    Log {
        level: u8,
        target: &'a str,
        message: &'a str,
    },
    Request {
        to: &'a str,
        kind: &'a str,
        #[serde(borrow)]
        payload: &'a [u8],
        timeout_ms: u64,
    },
    Emit {
        to: &'a str,
        kind: &'a str,
        #[serde(borrow)]
        payload: &'a [u8],
    },
}

/// A reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireReply<'a> {
    pub code: u32,
    pub message: &'a str,
    #[serde(borrow)]
    pub data: &'a [u8],
}

impl<'a> WireReply<'a> {
    pub fn of(reply: &'a plugin_api::Reply) -> Self {
        WireReply {
            code: reply.code,
            message: &reply.message,
            data: &reply.data,
        }
    }

    pub fn to_reply(&self) -> plugin_api::Reply {
        plugin_api::Reply {
            code: self.code,
            message: self.message.to_owned(),
            data: self.data.to_vec(),
        }
    }
}

/// A manifest on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireManifest<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub dependencies: Vec<&'a str>,
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The other end closed its socket: it exited or was killed.
    #[error("its socket was closed")]
    Closed,
    /// Nothing came in time.
    #[error("did not answer within {:?}", Duration::from_millis(u64::try_from(.0.as_millis()).unwrap_or(u64::MAX)))]
    TimedOut(Duration),
    /// The socket failed.
    #[error("its socket failed: {0}")]
    Io(#[from] io::Error),
    /// A frame that is no message of the protocol.
    #[error("it sent a malformed frame: {0}")]
    Malformed(String),
}

/// One end of a socket, framed.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: UnixStream,
    /// Bytes read: `[consumed..filled]` are not yet handed out.
    buf: Vec<u8>,
    filled: usize,
    /// The end of the frame handed out last, dropped at the next receive.
    consumed: usize,
    out: Vec<u8>,
}

impl Conn {
    /// Frames `stream`, which is made non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            filled: 0,
            consumed: 0,
            out: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends one message, waiting for room at most until `deadline` (for ever when `None`).
    pub fn send<T: Serialize>(
        &mut self,
        message: &T,
        deadline: Option<Instant>,
    ) -> Result<(), WireError> {
        self.out.clear();
        self.out.extend_from_slice(&[0; 4]);
        let out = std::mem::take(&mut self.out);
        let mut out = postcard::to_extend(message, out)
            .map_err(|e| WireError::Malformed(format!("cannot encode a message: {e}")))?;
        let length = out.len() - 4;
        if length > MAX_FRAME {
            self.out = out;
            return Err(WireError::Malformed(format!(
                "a message of {length} bytes is over the limit of {MAX_FRAME}"
            )));
        }
        out[..4].copy_from_slice(&(length as u32).to_le_bytes());
        let sent = self.write_all(&out, deadline);
        self.out = out;
        if self.out.capacity() > 1 << 20 {
            self.out = Vec::with_capacity(64 * 1024);
        }
        sent
    }

    fn write_all(&mut self, mut bytes: &[u8], deadline: Option<Instant>) -> Result<(), WireError> {
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(&self.stream, nix::poll::PollFlags::POLLOUT, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(WireError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Receives one message: polls for it during `spin`, then sleeps until it comes or
    /// `deadline` passes (never, when `None`).
    pub fn recv<'a, T: Deserialize<'a>>(
        &'a mut self,
        spin: Duration,
        deadline: Option<Instant>,
    ) -> Result<T, WireError> {
        let frame = self.next_frame(spin, deadline)?;
        postcard::from_bytes(&self.buf[frame.0..frame.1])
            .map_err(|e| WireError::Malformed(e.to_string()))
    }

    fn next_frame(
        &mut self,
        spin: Duration,
        deadline: Option<Instant>,
    ) -> Result<(usize, usize), WireError> {
        // The frame handed out last goes.
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
            if self.buf.len() > 1 << 20 && self.filled < 64 * 1024 {
                self.buf.truncate(64 * 1024);
                self.buf.shrink_to_fit();
            }
        }
        let spin_until = Instant::now() + spin;
        loop {
            if self.filled >= 4 {
                let length =
                    u32::from_le_bytes(self.buf[..4].try_into().expect("four bytes")) as usize;
                if length > MAX_FRAME {
                    return Err(WireError::Malformed(format!(
                        "a frame of {length} bytes is over the limit of {MAX_FRAME}"
                    )));
                }
                if self.filled >= 4 + length {
                    self.consumed = 4 + length;
                    return Ok((4, 4 + length));
                }
                if self.buf.len() < 4 + length {
                    self.buf.resize(4 + length, 0);
                }
            }
            if self.filled == self.buf.len() {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
            match self.stream.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() < spin_until && deadline.is_none_or(|d| Instant::now() < d) {
                        std::thread::yield_now();
                    } else {
                        wait(&self.stream, nix::poll::PollFlags::POLLIN, deadline)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(WireError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sleeps until `fd` is ready for `events` (or hung up), or `deadline` passes.
fn wait(
    fd: &impl AsFd,
    events: nix::poll::PollFlags,
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    use nix::poll::{poll, PollFd, PollTimeout};
    let started = Instant::now();
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(WireError::TimedOut(started.elapsed()));
                }
                // Rounded up: a poll that returns a little early only loops.
                PollTimeout::try_from(
                    left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
                )
                .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match poll(&mut fds, timeout) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_a_socket_pair_whole_and_borrowed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a).unwrap(), Conn::new(b).unwrap());
        let big = vec![7u8; 3 << 20];
        let writer = std::thread::spawn(move || {
            a.send(
                &ToWorker::Handle {
                    from: "external",
                    kind: "put",
                    payload: &big,
                },
                None,
            )
            .unwrap();
            a.send(&ToWorker::Exit, None).unwrap();
            a
        });
        match b.recv::<ToWorker>(Duration::ZERO, None).unwrap() {
            ToWorker::Handle {
                from,
                kind,
                payload,
            } => {
                assert_eq!((from, kind, payload.len()), ("external", "put", 3 << 20));
                assert!(payload.iter().all(|&b| b == 7));
            }
            other => panic!("got {other:?}"),
        }
        assert!(matches!(
            b.recv::<ToWorker>(Duration::ZERO, None).unwrap(),
            ToWorker::Exit
        ));
        drop(writer.join().unwrap());
        assert!(matches!(
            b.recv::<ToWorker>(Duration::ZERO, None),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn a_frame_longer_than_the_limit_is_refused_before_anything_is_allocated() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Conn::new(b).unwrap();
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            b.recv::<FromWorker>(Duration::ZERO, None),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut b = Conn::new(b).unwrap();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert!(matches!(
            b.recv::<FromWorker>(Duration::from_millis(1), Some(deadline)),
            Err(WireError::TimedOut(_))
        ));
    }
}
