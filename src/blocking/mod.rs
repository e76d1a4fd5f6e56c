//! Blocking drivers over `std::io` (feature `std`): thin loops around the sans-IO machines,
//! never a second implementation of the protocol.
//!
//! - [`client`]: [`BlockingClient`] connects from an NBD URI (or runs over any
//!   `Read + Write`) and offers `read_at`, `write_at`, `block_status` and friends, plus
//!   `submit_*`/`complete` for many requests in flight.
//! - [`server`]: [`server::serve`] runs one connection over any `Read + Write` on a
//!   [`server::Backend`].
//!
//! Neither does TLS itself: after `NBD_OPT_STARTTLS` they hand the boxed [`Stream`] to a
//! `client::TlsConnector` or `server::TlsAcceptor` that the application implements
//! (the examples do it with rustls), so the library has no TLS dependency.

use std::io::{Read, Write};

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "client")]
pub use self::client::{
    errno_of, BlockingClient, CommandError, Completion, NoSink, Sink, Socket, TlsConnector,
};

/// A byte stream a driver can run over, boxed so that TLS can replace it: the plain socket
/// before `NBD_OPT_STARTTLS`, the encrypted session after (see `client::TlsConnector` and
/// `server::TlsAcceptor`).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}
