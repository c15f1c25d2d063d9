//! Service states in etcd, behind the kernel's [`StateBackend`] seam.
//!
//! A state is sealed exactly as a state file is ([`host::state::seal_state`]). One of at
//! most [`CHUNK`] bytes is written with its pointer, in one fenced transaction: the
//! pointer's value is a line of JSON, then the sealed bytes. A larger one (etcd refuses
//! requests over 1.5 MiB) is written under a new generation in chunks of at most [`CHUNK`]
//! bytes, each fenced; one small transaction then switches the service's pointer to the new
//! generation and removes the old one. A reader reads the pointer, then the generation's
//! chunks at the pointer's revision, checks their length against it, and opens them as a
//! state file is opened (AES-GCM authenticates every byte, so a mix of two generations
//! would fail to open as a damaged file does): it
//! never sees a mix of two generations.

use std::path::PathBuf;

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use host::state::{open_sealed, seal_state, SavedState, StateBackend, StateError};

use crate::{error::FleetError, owner::Fleet, session::unix_now};

/// The largest chunk of a state written in one request.
pub const CHUNK: usize = 1 << 20;

/// What a service's state pointer holds (then, for a state held inline, the sealed bytes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Pointer {
    /// The generation whose chunks hold the state; empty when the state is inline.
    generation: String,
    chunks: usize,
    len: usize,
    /// The node that wrote it, and when (Unix seconds): for operators.
    node: String,
    written: u64,
}

impl Fleet {
    fn store_error(&self, service: &str, op: &'static str, error: FleetError) -> StateError {
        StateError::Store {
            service: service.to_owned(),
            location: self.location(service).display().to_string(),
            op,
            source: Box::new(error),
        }
    }

    /// A write refused by its fence (or never tried, without a claim): counted, logged.
    fn refused(&self, service: &str, owner: Option<String>) -> StateError {
        let refused = self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::error!(
            service,
            node = %self.node,
            owner = owner.as_deref().unwrap_or("none"),
            refused,
            "state write refused: this host no longer owns the service (fenced)"
        );
        StateError::NotOwner {
            service: service.to_owned(),
            node: self.node.clone(),
            owner,
        }
    }

    /// The generation of `service`'s state now: the one this host last wrote or read, or
    /// the pointer's.
    fn current_generation(&self, service: &str) -> Result<Option<String>, FleetError> {
        if let Some(known) = self.generations.lock().get(service) {
            return Ok(Some(known.clone()));
        }
        let key = self.keys.current(service);
        let got = self
            .etcd()
            .call("reading the state pointer", move |mut c| async move {
                c.get(key, None).await
            })?;
        Ok(got
            .kvs()
            .first()
            .and_then(|kv| Pointer::read(kv.value()))
            .map(|(p, _)| p.generation))
    }
}

impl Pointer {
    /// The pointer's value: its JSON line, then the inline state.
    fn value(&self, inline: &[u8]) -> Vec<u8> {
        let mut value = serde_json::to_vec(self).expect("a pointer serializes");
        value.push(b'\n');
        value.extend_from_slice(inline);
        value
    }

    /// A pointer's value read back: the pointer, and the inline state.
    fn read(value: &[u8]) -> Option<(Pointer, &[u8])> {
        let end = value.iter().position(|b| *b == b'\n')?;
        Some((
            serde_json::from_slice(&value[..end]).ok()?,
            &value[end + 1..],
        ))
    }
}

impl StateBackend for Fleet {
    fn save(&self, service: &str, version: &str, bytes: &[u8]) -> Result<(), StateError> {
        let location = self.location(service);
        let Some(fence) = self.fence(service) else {
            return Err(self.refused(service, self.owner_of(service)));
        };
        let sealed = seal_state(&self.keyring, &location, service, version, bytes)?;
        let old = self
            .current_generation(service)
            .map_err(|e| self.store_error(service, "reading the state pointer", e))?;
        let owner_key = self.keys.owner(service);
        let inline = sealed.len() <= CHUNK;
        let generation = if inline {
            String::new()
        } else {
            crate::session::random_token()
        };
        let chunks: Vec<&[u8]> = if inline {
            Vec::new()
        } else {
            sealed.chunks(CHUNK).collect()
        };
        let pointer = Pointer {
            generation: generation.clone(),
            chunks: chunks.len(),
            len: sealed.len(),
            node: self.node.clone(),
            written: unix_now(),
        };
        // Every chunk in a transaction of its own, fenced too: a host that no longer owns
        // the service writes nothing at all.
        for (index, chunk) in chunks.iter().enumerate() {
            let txn = Txn::new()
                .when([fence.clone()])
                .and_then([TxnOp::put(
                    self.keys.chunk(service, &generation, index),
                    chunk.to_vec(),
                    None,
                )])
                .or_else([TxnOp::get(owner_key.clone(), None)]);
            let written = self
                .etcd()
                .call("writing a chunk of the state", move |mut c| async move {
                    c.txn(txn).await
                });
            match written {
                Ok(response) if response.succeeded() => {}
                Ok(response) => {
                    self.remove_generation(service, &generation);
                    return Err(self.refused(service, owner_in(&response)));
                }
                Err(error) => {
                    self.remove_generation(service, &generation);
                    return Err(self.store_error(service, "writing a chunk of the state", error));
                }
            }
        }
        let mut ops = vec![TxnOp::put(
            self.keys.current(service),
            pointer.value(if inline { &sealed } else { &[] }),
            None,
        )];
        if let Some(old) = old.filter(|old| !old.is_empty() && *old != generation) {
            ops.push(TxnOp::delete(
                self.keys.generation(service, &old),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
        let txn = Txn::new()
            .when([fence])
            .and_then(ops)
            .or_else([TxnOp::get(owner_key, None)]);
        let switched = self.etcd().call(
            "switching the state to its new generation",
            move |mut c| async move { c.txn(txn).await },
        );
        match switched {
            Ok(response) if response.succeeded() => {
                self.generations
                    .lock()
                    .insert(service.to_owned(), generation);
                self.written
                    .fetch_add(sealed.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Ok(response) => {
                self.remove_generation(service, &generation);
                Err(self.refused(service, owner_in(&response)))
            }
            Err(error) => {
                // Whether it was applied is unknown: the next write reads the pointer.
                self.generations.lock().remove(service);
                Err(self.store_error(service, "switching the state to its new generation", error))
            }
        }
    }

    fn load(&self, service: &str) -> Result<Option<SavedState>, StateError> {
        let location = self.location(service);
        let key = self.keys.current(service);
        let got = self
            .etcd()
            .call("reading the state pointer", move |mut c| async move {
                c.get(key, None).await
            })
            .map_err(|e| self.store_error(service, "reading the state pointer", e))?;
        let Some(kv) = got.kvs().first() else {
            return Ok(None);
        };
        let revision = got.header().map_or(0, |h| h.revision());
        let (pointer, inline) = Pointer::read(kv.value()).ok_or(StateError::NotAStateFile {
            path: location.clone(),
        })?;
        let mut sealed = Vec::with_capacity(pointer.len);
        sealed.extend_from_slice(inline);
        for index in 0..pointer.chunks {
            let key = self.keys.chunk(service, &pointer.generation, index);
            // At the pointer's revision: a newer generation may have replaced this one
            // since, and removed it.
            let got = self
                .etcd()
                .call("reading a chunk of the state", move |mut c| async move {
                    c.get(key, Some(GetOptions::new().with_revision(revision)))
                        .await
                })
                .map_err(|e| self.store_error(service, "reading a chunk of the state", e))?;
            let Some(chunk) = got.kvs().first() else {
                return Err(StateError::Truncated {
                    path: location,
                    len: sealed.len(),
                });
            };
            sealed.extend_from_slice(chunk.value());
        }
        if sealed.len() != pointer.len {
            return Err(StateError::Truncated {
                path: location,
                len: sealed.len(),
            });
        }
        let saved = open_sealed(&self.keyring, &location, &sealed, service)?;
        self.generations
            .lock()
            .insert(service.to_owned(), pointer.generation);
        Ok(Some(saved))
    }

    fn quarantine(&self, service: &str) -> Result<PathBuf, StateError> {
        let Some(fence) = self.fence(service) else {
            return Err(self.refused(service, self.owner_of(service)));
        };
        let current = self.keys.current(service);
        let got = self
            .etcd()
            .call("reading the state pointer", {
                let current = current.clone();
                move |mut c| async move { c.get(current, None).await }
            })
            .map_err(|e| self.store_error(service, "reading the state pointer", e))?;
        let value = got
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or_default();
        let aside = self.keys.set_aside(service, unix_now());
        let txn = Txn::new().when([fence]).and_then([
            TxnOp::put(aside.clone(), value, None),
            TxnOp::delete(current, None),
        ]);
        let moved = self
            .etcd()
            .call("setting the state aside", move |mut c| async move {
                c.txn(txn).await
            })
            .map_err(|e| self.store_error(service, "setting the state aside", e))?;
        if !moved.succeeded() {
            return Err(self.refused(service, self.owner_of(service)));
        }
        self.generations.lock().remove(service);
        Ok(PathBuf::from(format!("etcd:{aside}")))
    }

    fn location(&self, service: &str) -> PathBuf {
        PathBuf::from(format!("etcd:{}", self.keys.current(service)))
    }

    fn bytes_written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The owner a failed fenced transaction read (its `or_else` get of the owner key).
fn owner_in(response: &etcd_client::TxnResponse) -> Option<String> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
        _ => None,
    })
}
