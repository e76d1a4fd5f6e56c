//! A sans-IO implementation of the NBD (Network Block Device) protocol.
//!
//! NBD lets a client use a block device that lives on another machine. This crate is the
//! protocol, and only the protocol: pure codecs for every message, and event-driven client
//! and server state machines that take bytes in and give events and bytes out. It never
//! touches a socket, a file, a clock or a thread, so the same machine serves a blocking
//! program, an async runtime, a kernel-bypass stack, a fuzzer and firmware without a heap.
//!
//! # What sans-IO means here
//!
//! - **You own the I/O.** You read bytes from your transport and hand them to
//!   `handle_input`; the machine encodes what must be sent into a buffer you give
//!   `poll_transmit`. Timeouts, retries and threads are your policy.
//! - **You own the buffers.** Input is a borrowed `&[u8]`; the machine says how much it
//!   consumed. Output is written into your `&mut [u8]`. Events may borrow your input.
//! - **Payloads pass beside the machine.** Read data and write payloads never go through
//!   it: it tells you how many bytes of *your* buffer to send ([`Transmit::Payload`]) or to
//!   receive ([`Want::Payload`]), and you move them straight between the transport and
//!   your storage. The machines see only lengths.
//! - **Memory is fixed.** The machines hold their state inline: const-generic tables and
//!   fixed buffers, no allocation, not even with `alloc`. Every length a peer declares is
//!   checked before it is used, and refused data is discarded in pieces of your choosing.
//!
//! # The run loop
//!
//! Both machines follow the same loop. The client's, with a complete example over a
//! `TcpStream`, is in [`client`]; the server's in [`server`]. Whole drivers to copy from:
//! [`blocking`] (threads), `examples/tokio-server.rs` and `examples/tokio-client.rs`
//! (tokio), and `ci/embedded-demo` (no heap, fixed buffers).
//!
//! 1. Drain `poll_transmit` until it returns `None`, sending every [`Transmit`] in order.
//! 2. Act on `wants()`: read until you hold [`Want::Bytes`] bytes and call `handle_input`;
//!    move a [`Want::Payload`] into your buffer and call `handle_payload`; discard a
//!    [`Want::Discard`]; or, for [`Want::Nothing`], wait for your own next call.
//! 3. `handle_input` consumes at most one message and returns at most one event (a
//!    [`Handled`]). Handle the event, answer it if it asks something, then drop the
//!    consumed bytes from your buffer.
//! 4. After every call that can queue output, go back to 1.
//! 5. When TLS is negotiated the machine emits a `StartTls` event: wrap your transport,
//!    tell the machine, and go on. Bytes that arrived in plaintext after the switch point are
//!    refused.
//!
//! A whole server in a few lines, with the blocking driver (feature `std`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_proto::blocking::server::{serve, Export, MemoryBackend, Options};
//!
//! let options = Arc::new(Options::new(vec![Export::new("", Arc::new(MemoryBackend::new(1 << 30)))]));
//! for stream in std::net::TcpListener::bind("127.0.0.1:10809")?.incoming() {
//!     let (stream, options) = (stream?, options.clone());
//!     std::thread::spawn(move || serve(stream, &options));
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Errors and panics
//!
//! Nothing a peer sends can make this crate panic, allocate without bound, loop forever or
//! truncate silently; the fuzz targets in `fuzz/` check it. Decoding errors are
//! [`wire::Error`]s that say what was wrong and, for short input, how many bytes are still
//! needed. The machines return [`Error`], which separates what the peer did
//! ([`Error::Malformed`], [`Error::PeerMisbehaved`] naming the rule broken,
//! [`Error::PeerIncompatible`], [`Error::UnexpectedEof`]) from what the caller did
//! ([`Error::Misuse`], [`Error::BufferTooSmall`]). Peer errors are fatal and sticky: the
//! machine is dead and every later call returns the same error. Caller errors change
//! nothing. NBD-level failures, such as an `NBD_EIO` reply, are not Rust errors but data in
//! events.
//!
//! # Features
//!
//! | feature | default | adds |
//! | --- | --- | --- |
//! | `client` | yes | the client machine, [`client`]; with `std`, the blocking client `blocking::client` |
//! | `server` | yes | the server machine, [`server`]; with `std`, the blocking server `blocking::server` |
//! | `std` | yes | `std::io::Error` conversions and the blocking drivers in `blocking` (for the roles enabled); implies `alloc` |
//! | `alloc` | via `std` | the NBD URI parser `uri`; nothing the machines need |
//! | `adversarial` | no | test-only: the `adversarial` module, making either machine misbehave on purpose to test peers; changes nothing unless its API is called; needs both roles |
//!
//! The codecs in [`wire`] and the shared types are always there. Firmware builds only the
//! role it needs: `default-features = false, features = ["client"]` (or `["server"]`) is
//! `#![no_std]`, needs no allocator, and the machine is complete. Every combination builds
//! (CI checks all of them); `ci/embedded-demo` links each role alone into a `no_std`
//! static library and measures its size (see the README).
//!
//! # Spec revision
//!
//! The NBD protocol as written in `doc/proto.md` of NetworkBlockDevice/nbd (master as of
//! 2025-06), plus the `extension-ext-header` branch for extended headers, 64-bit block
//! status and `NBD_FLAG_BLOCK_STATUS_PAYLOAD`, which QEMU 8.2+ and libnbd 1.18+ implement.
//!
//! # Not implemented
//!
//! - `NBD_CMD_RESIZE` and `NBD_FLAG_SEND_RESIZE`, defined only in a stale 2017 branch: the
//!   codecs know the numbers, the server refuses the command with `NBD_EINVAL`.
//! - TLS itself: the machines hand the transport over at the right moment (see
//!   [`TlsPolicy`]); the examples use rustls.

// Unit tests link the real `std` (proptest needs it); every other build is `no_std`, with
// `no-std-compat` standing in for `std` so that paths read the same in both.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![cfg_attr(not(fuzzing), deny(missing_docs))]
#![warn(unreachable_pub, elided_lifetimes_in_paths, unused_qualifications)]

#[cfg(not(test))]
extern crate no_std_compat as std;

/// `enforced!(machine, CHECK)`: true unless adversarial mode switched `CHECK` off on
/// `machine`. Without the `adversarial` feature it is the literal `true`, so a relaxable
/// check written `if enforced!(self, X) && bad { .. }` compiles exactly as `if bad { .. }`.
#[cfg(feature = "adversarial")]
macro_rules! enforced {
    ($machine:expr, $check:expr) => {
        $machine.enforces($check)
    };
}
#[cfg(not(feature = "adversarial"))]
#[allow(unused_macros)] // unused when neither role is built
macro_rules! enforced {
    ($machine:expr, $check:expr) => {
        true
    };
}

#[cfg(feature = "adversarial")]
pub mod adversarial;
#[cfg(all(feature = "std", any(feature = "client", feature = "server")))]
pub mod blocking;
#[cfg(feature = "client")]
pub mod client;
mod common;
pub mod error;
#[cfg(feature = "server")]
pub mod server;
#[cfg(all(
    any(test, feature = "_testing"),
    feature = "client",
    feature = "server"
))]
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "alloc")]
pub mod uri;
pub mod wire;

pub use common::{Handled, TlsPolicy, Transmit, Want};
pub use error::{Error, Incompatible, Misbehavior, Misuse};
pub use wire::{Cookie, Errno};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
