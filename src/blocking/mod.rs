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

use std::io::{self, IoSlice, Read, Write};

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

/// Writes every buffer of `bufs`, with as few system calls as the stream allows.
pub(crate) fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
