//! nbd-proto on firmware terms: `#![no_std]`, no allocator, fixed-size buffers only.
//!
//! A [`ClientSide`](client_side::ClientSide) and a [`ServerSide`](server_side::ServerSide),
//! each a machine of `nbd-proto` plus the few lines of run loop around it, exchange a full
//! fixed-newstyle handshake (with extended headers), a 1 KiB write and the read that
//! brings it back, then disconnect. The transport between them is two fixed-size
//! [`Pipe`]s; the server's disk is a fixed array; the write data is a `static`.
//!
//! The crate builds as a `staticlib` with its own panic handler, so any `std` in the
//! dependency graph fails the build (E0152). It exports one C function, [`nbd_demo_run`],
//! which runs whichever roles were built:
//!
//! - both (default features): the two machines against each other, checking that the data
//!   read back is the data written, and that each side sent exactly the bytes of the
//!   recorded [`transcript`];
//! - `--no-default-features --features client` (or `server`): one machine alone against
//!   the transcript of the other side, checking every byte it sends and the data.
//!
//! `cargo test` runs the same functions on the host (only the panic handler and the
//! `no_std` attribute are left out of test builds). `measure.sh` builds each role with
//! `opt-level = "z"` and reports its code size.
#![cfg_attr(not(test), no_std)]
// `deny`, not `forbid`: the `unsafe_code` lint also covers `#[no_mangle]`, and the one
// export below must allow it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "client")]
pub mod client_side;
mod pipe;
#[cfg(feature = "server")]
pub mod server_side;
pub mod transcript;

pub use pipe::Pipe;

/// The export both sides use.
pub const EXPORT: &str = "demo";
/// Size of the server's RAM disk.
pub const DISK_LEN: usize = 8192;
/// Where the write lands.
pub const DATA_OFFSET: u64 = 4096;
/// Length of the write and of the read.
pub const DATA_LEN: usize = 1024;
/// In-flight capacity of both machines (`Client<N>`, `Server<N, B>`).
pub const IN_FLIGHT: usize = 4;
/// Size of the server machine's output buffer (`B` in `Server<N, B>`).
pub const SERVER_OUTPUT: usize = 1024;
/// Capacity of each direction of the transport.
pub const PIPE_LEN: usize = 2048;

/// The data written (and expected back): a fixed pattern, in read-only memory.
pub static WRITE_DATA: [u8; DATA_LEN] = pattern();

const fn pattern() -> [u8; DATA_LEN] {
    let mut data = [0u8; DATA_LEN];
    let mut i = 0;
    while i < DATA_LEN {
        data[i] = (i as u8)
            .wrapping_mul(31)
            .wrapping_add((i >> 8) as u8 ^ 0x5a);
        i += 1;
    }
    data
}

/// Why a run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoError {
    /// A machine returned an error.
    Protocol(nbd_proto::Error),
    /// The peer refused the export or a command.
    Refused,
    /// The peer did something this demo never does (an unexpected event or transmit).
    Unexpected,
    /// Bytes or data differ from what was expected.
    Mismatch,
    /// Neither side can make progress.
    Stalled,
}

impl DemoError {
    /// A small number for the C caller (0 is success).
    pub fn code(self) -> u32 {
        match self {
            Self::Protocol(_) => 1,
            Self::Refused => 2,
            Self::Unexpected => 3,
            Self::Mismatch => 4,
            Self::Stalled => 5,
        }
    }
}

impl From<nbd_proto::Error> for DemoError {
    fn from(e: nbd_proto::Error) -> Self {
        Self::Protocol(e)
    }
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    ToServer,
    /// Server to client.
    ToClient,
}

/// Rounds without progress (or in all) after which a run is declared stalled.
const MAX_ROUNDS: usize = 10_000;

/// Both machines and the transport between them.
#[cfg(all(feature = "client", feature = "server"))]
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The client.
    pub client: client_side::ClientSide,
    /// The server.
    pub server: server_side::ServerSide,
    /// Client to server.
    pub c2s: Pipe<PIPE_LEN>,
    /// Server to client.
    pub s2c: Pipe<PIPE_LEN>,
}

#[cfg(all(feature = "client", feature = "server"))]
impl Exchange {
    /// Both sides at the start.
    pub fn new() -> Result<Self, DemoError> {
        Ok(Self {
            client: client_side::ClientSide::new()?,
            server: server_side::ServerSide::new(),
            c2s: Pipe::new(),
            s2c: Pipe::new(),
        })
    }

    /// Steps both sides until the session is over; `observe` sees every byte sent, in
    /// order. Then checks that the read brought back [`WRITE_DATA`].
    pub fn run(&mut self, observe: &mut dyn FnMut(Direction, &[u8])) -> Result<(), DemoError> {
        for _ in 0..MAX_ROUNDS {
            let before = self.c2s.data().len();
            let client = self.client.step(&mut self.s2c, &mut self.c2s)?;
            observe(Direction::ToServer, &self.c2s.data()[before..]);
            let before = self.s2c.data().len();
            let server = self.server.step(&mut self.c2s, &mut self.s2c)?;
            observe(Direction::ToClient, &self.s2c.data()[before..]);
            // The server hangs up once it is done; the client then sees end of file.
            let closing = self.server.is_done() && !self.s2c.is_closed();
            if closing {
                self.s2c.close();
            }
            if self.client.is_done() && self.server.is_done() {
                return check(self.client.read_data())
                    .and_then(|()| check(disk_data(self.server.disk())));
            }
            if !client && !server && !closing {
                return Err(DemoError::Stalled);
            }
        }
        Err(DemoError::Stalled)
    }
}

/// The bytes of `disk` the write covered.
#[cfg(feature = "server")]
fn disk_data(disk: &[u8]) -> &[u8] {
    let at = DATA_OFFSET as usize;
    disk.get(at..at + DATA_LEN).unwrap_or(&[])
}

fn check(data: &[u8]) -> Result<(), DemoError> {
    if data == &WRITE_DATA[..] {
        Ok(())
    } else {
        Err(DemoError::Mismatch)
    }
}

/// The recorded other side of a connection: feeds its bytes in as the pipe has room, and
/// checks every byte the machine under test sends against the recording.
#[cfg(any(feature = "client", feature = "server"))]
struct Script {
    feed: &'static [u8],
    fed: usize,
    expect: &'static [u8],
    matched: usize,
}

#[cfg(any(feature = "client", feature = "server"))]
impl Script {
    /// Moves recorded bytes into `to` and checks (and drains) what arrived in `from`.
    /// Returns whether anything moved.
    fn play<const C: usize>(
        &mut self,
        to: &mut Pipe<C>,
        from: &mut Pipe<C>,
    ) -> Result<bool, DemoError> {
        let n = to.push(&self.feed[self.fed..]);
        self.fed += n;
        if self.fed == self.feed.len() && !to.is_closed() {
            // The recorded peer has said everything: it closes its side.
            to.close();
        }
        let got = from.data();
        let want = self.expect.get(self.matched..self.matched + got.len());
        if want != Some(got) {
            return Err(DemoError::Mismatch);
        }
        let k = got.len();
        self.matched += k;
        from.consume(k);
        Ok(n > 0 || k > 0)
    }

    fn finished(&self) -> bool {
        self.fed == self.feed.len() && self.matched == self.expect.len()
    }
}

/// The client alone against the recorded server: every byte it sends must match the
/// recorded client bytes, and the read must bring back [`WRITE_DATA`].
#[cfg(feature = "client")]
pub fn run_client_against_transcript(
    client: &mut client_side::ClientSide,
) -> Result<(), DemoError> {
    let mut server = Script {
        feed: &transcript::TO_CLIENT,
        fed: 0,
        expect: &transcript::TO_SERVER,
        matched: 0,
    };
    let (mut c2s, mut s2c) = (Pipe::<PIPE_LEN>::new(), Pipe::<PIPE_LEN>::new());
    for _ in 0..MAX_ROUNDS {
        let moved = client.step(&mut s2c, &mut c2s)?;
        let played = server.play(&mut s2c, &mut c2s)?;
        if client.is_done() {
            return if server.finished() {
                check(client.read_data())
            } else {
                Err(DemoError::Mismatch)
            };
        }
        if !moved && !played {
            return Err(DemoError::Stalled);
        }
    }
    Err(DemoError::Stalled)
}

/// The server alone against the recorded client: every byte it sends must match the
/// recorded server bytes, and the disk must hold [`WRITE_DATA`] afterwards.
#[cfg(feature = "server")]
pub fn run_server_against_transcript(
    server: &mut server_side::ServerSide,
) -> Result<(), DemoError> {
    let mut client = Script {
        feed: &transcript::TO_SERVER,
        fed: 0,
        expect: &transcript::TO_CLIENT,
        matched: 0,
    };
    let (mut c2s, mut s2c) = (Pipe::<PIPE_LEN>::new(), Pipe::<PIPE_LEN>::new());
    for _ in 0..MAX_ROUNDS {
        let moved = server.step(&mut c2s, &mut s2c)?;
        let played = client.play(&mut c2s, &mut s2c)?;
        if server.is_done() && s2c.data().is_empty() {
            return if client.finished() {
                check(disk_data(server.disk()))
            } else {
                Err(DemoError::Mismatch)
            };
        }
        if !moved && !played {
            return Err(DemoError::Stalled);
        }
    }
    Err(DemoError::Stalled)
}

/// Runs the roles this library was built with (see the crate docs). Returns 0 on success,
/// else a [`DemoError::code`].
#[allow(unsafe_code)] // `no_mangle` only: the exported symbol name.
#[no_mangle]
pub extern "C" fn nbd_demo_run() -> u32 {
    match run() {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

/// Both roles: the machines against each other, checked against the transcript too.
#[cfg(all(feature = "client", feature = "server"))]
fn run() -> Result<(), DemoError> {
    let mut exchange = Exchange::new()?;
    let (mut to_server, mut to_client) = (0usize, 0usize);
    let mut same = true;
    exchange.run(&mut |direction, bytes| {
        let (recorded, at) = match direction {
            Direction::ToServer => (&transcript::TO_SERVER[..], &mut to_server),
            Direction::ToClient => (&transcript::TO_CLIENT[..], &mut to_client),
        };
        same &= recorded.get(*at..*at + bytes.len()) == Some(bytes);
        *at += bytes.len();
    })?;
    let complete =
        to_server == transcript::TO_SERVER.len() && to_client == transcript::TO_CLIENT.len();
    if same && complete {
        Ok(())
    } else {
        Err(DemoError::Mismatch)
    }
}

/// The client alone.
#[cfg(all(feature = "client", not(feature = "server")))]
fn run() -> Result<(), DemoError> {
    run_client_against_transcript(&mut client_side::ClientSide::new()?)
}

/// The server alone.
#[cfg(all(feature = "server", not(feature = "client")))]
fn run() -> Result<(), DemoError> {
    run_server_against_transcript(&mut server_side::ServerSide::new())
}

/// No role: nothing to run.
#[cfg(not(any(feature = "client", feature = "server")))]
fn run() -> Result<(), DemoError> {
    Err(DemoError::Unexpected)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

// The host tests need both roles (the default features).
#[cfg(all(test, feature = "client", feature = "server"))]
mod tests;
