//! The state-machine targets: `client_input`, `server_input`, `client_ops`, `server_ops`
//! and `pair`. Each drives a machine the way a real driver does and checks, besides "no
//! panic", the contracts the machines document:
//!
//! - **fatal errors are sticky**: after an `Err` that `is_fatal()`, the machine reports its
//!   dead state and every later input call returns the same error ([`client::Checked`],
//!   [`server::Checked`]); caller errors change nothing observable;
//! - **every client command completes exactly once**: `Event::Done` (from `handle_input` or
//!   `poll_event`) or `Event::Abandoned` (from `poll_event` after end of file or a fatal
//!   error), never twice, never lost;
//! - **memory stays bounded**: `Want::Bytes` never asks for more than
//!   `client::MAX_FRAME_LEN` (client) or `max_option_len + 16` / the largest request
//!   (server); `poll_transmit` never writes past the buffer it is given, never needs more
//!   than the documented maximum, and payload markers match what was asked;
//! - **events borrow only the bytes they consumed**: every string or extent list an event
//!   carries lies inside `input[..consumed]`;
//! - **splitting does not matter**: `client_input` and `server_input` run each input whole
//!   and again through a driver that reads exactly what `wants()` says in data-derived
//!   pieces (with data-derived `poll_transmit` buffer sizes), and compare the event logs,
//!   the results and every output byte;
//! - **a client and a server agree** (`pair`): what the client reads equals what the
//!   server's disk held, block status describes it, and neither side ever fails.
//!
//! The machines are fuzzed as the `no_std` crate (`default-features = false`): the
//! drivers here are the fuzz crate's own, not `nbd_proto::testing::Pair`, which needs the
//! `_testing` (and so `std`) feature.

pub mod client;
pub mod ops;
pub mod pair;
pub mod script;
pub mod server;

use std::fmt::Debug;

use nbd_proto::Want;

/// A small deterministic generator (xorshift64*), seeded from the input, for split points
/// and buffer sizes: the same input always splits the same way.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeds from bytes (FNV-1a), never zero.
    pub fn from_bytes(data: &[u8]) -> Self {
        let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(h | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A piece size in `1..=max`, biased to small ones (the interesting splits are inside
    /// headers).
    pub fn piece(&mut self, max: usize) -> usize {
        let r = self.next_u64();
        let cap = match r % 4 {
            0 => 1,
            1 => 8,
            2 => 64,
            _ => max,
        };
        1 + (r >> 8) as usize % cap.clamp(1, max.max(1))
    }
}

/// A recorded peer stream, delivered to a machine the way a driver would: whole, or in
/// pieces `split` chooses, and never past a TLS point (where the transport changes) before
/// everything ahead of it has been consumed. `client_input` and `server_input` drive their
/// machine with one.
pub struct Feed<'s> {
    stream: &'s [u8],
    /// Offsets in `stream` where TLS starts.
    points: Vec<usize>,
    split: Option<Rng>,
    /// Bytes of `stream` delivered: into `buf`, or moved as payload.
    pub delivered: usize,
    /// Delivered and not yet consumed.
    pub buf: Vec<u8>,
    /// How far delivery may go in this step (see [`step`](Self::step)).
    limit: usize,
    /// Stuck before a TLS point: the next step may cross it.
    past_point: bool,
}

impl<'s> Feed<'s> {
    pub fn new(stream: &'s [u8], points: Vec<usize>, split: Option<Rng>) -> Self {
        Self {
            stream,
            points,
            split,
            delivered: 0,
            buf: Vec::new(),
            limit: 0,
            past_point: false,
        }
    }

    /// Starts a step: delivery stops at the next TLS point, or right here while bytes
    /// before one are still buffered.
    pub fn step(&mut self) {
        let d = self.delivered;
        self.limit = if !self.past_point && !self.buf.is_empty() && self.points.contains(&d) {
            d
        } else {
            self.points
                .iter()
                .copied()
                .find(|&p| p > d)
                .unwrap_or(self.stream.len())
        };
        self.past_point = false;
    }

    fn piece(&mut self, max: usize) -> usize {
        match &mut self.split {
            None => max,
            Some(r) => r.piece(max).min(max),
        }
    }

    fn deliver(&mut self, n: usize) {
        self.buf
            .extend_from_slice(&self.stream[self.delivered..self.delivered + n]);
        self.delivered += n;
    }

    /// Moves up to `len` payload bytes (buffered ones first) as a driver answering
    /// `Want::Payload` or `Want::Discard` would, and returns how many (0: none left).
    pub fn payload(&mut self, len: usize) -> usize {
        if self.buf.is_empty() {
            let n = self.piece(len.min(self.limit - self.delivered));
            self.delivered += n;
            n
        } else {
            let n = self.piece(len.min(self.buf.len()));
            self.buf.drain(..n);
            n
        }
    }

    /// Delivers input for `want` (`Bytes` or `Nothing`): what a driver reading for it
    /// would get. Whole runs deliver everything up to the limit at once.
    pub fn offer(&mut self, want: Want) {
        let whole = self.split.is_none();
        match want {
            Want::Bytes(w) if self.buf.len() < w && self.delivered < self.limit => {
                let n = self.piece((w - self.buf.len()).min(self.limit - self.delivered));
                let n = if whole {
                    self.limit - self.delivered
                } else {
                    n
                };
                self.deliver(n);
            }
            Want::Nothing if self.delivered < self.limit && (whole || self.buf.is_empty()) => {
                let n = self.piece(self.limit - self.delivered);
                self.deliver(n);
            }
            _ => {}
        }
    }

    /// The machine made no progress with what is buffered: delivers more (or lets the next
    /// step cross a TLS point). False once the stream is all delivered.
    pub fn stalled(&mut self) -> bool {
        if self.delivered == self.stream.len() {
            return false;
        }
        if self.limit == self.delivered {
            self.past_point = true;
        } else {
            let n = self.piece(self.limit - self.delivered);
            self.deliver(n);
        }
        true
    }

    /// Drops `n` consumed bytes from the front of `buf`.
    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }
}

/// True if `part` (non-empty) lies inside `whole`, by address.
pub fn inside(part: &[u8], whole: &[u8]) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

/// Panics unless `part` is empty or lies inside `whole` (an event's borrowed data must be
/// part of the bytes it consumed).
#[track_caller]
pub fn check_borrow(what: &str, part: &[u8], whole: &[u8], ev: &dyn Debug) {
    assert!(
        part.is_empty() || inside(part, whole),
        "{what} of event {ev:?} is not inside the {} bytes the call consumed",
        whole.len()
    );
}

/// Big-endian readers over possibly short input (missing bytes read as 0).
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    /// Takes `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    /// A byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A big-endian integer of `n` bytes (`n` <= 8), zero-padded past the end.
    pub fn be(&mut self, n: usize) -> u64 {
        self.take(n).iter().fold(0, |v, b| (v << 8) | u64::from(*b))
    }
}

// Helpers: `FUZZ_TARGET=client_input FUZZ_INPUT=path cargo test --lib debug -- --ignored
// --nocapture` runs one input; `random_inputs` throws random bytes at every machine target.
#[cfg(test)]
mod smoke {
    #[test]
    fn scripted() {
        for sel in 0u8..=255 {
            let n = crate::client_input(&[sel, 0, 0]);
            if sel & 3 != 0 {
                assert!(n > 0);
            }
            crate::server_input(&[sel]);
        }
    }
}

#[cfg(test)]
mod debug {
    /// `FUZZ_TARGET=name FUZZ_INPUT=path cargo test --lib debug -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn one() {
        let name = std::env::var("FUZZ_TARGET").unwrap();
        let data = std::fs::read(std::env::var("FUZZ_INPUT").unwrap()).unwrap();
        let (_, f) = crate::MACHINE_TARGETS
            .iter()
            .chain(crate::TARGETS)
            .find(|(n, _)| *n == name)
            .unwrap();
        eprintln!("{} events", f(&data));
    }
}

#[cfg(test)]
mod random {
    #[test]
    #[ignore]
    fn random_inputs() {
        let mut r = crate::machines::Rng::from_bytes(b"seed");
        for i in 0..3000 {
            let len = (r.next_u64() % 600) as usize;
            let data: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
            for (name, f) in crate::MACHINE_TARGETS {
                let res = std::panic::catch_unwind(|| f(&data));
                if res.is_err() {
                    std::fs::write(format!("/tmp/rnd-{name}-{i}"), &data).unwrap();
                    panic!("{name} failed on input {i}");
                }
            }
        }
    }
}
