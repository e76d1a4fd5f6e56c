//! Blocking drivers over `std::io` (feature `std`): thin loops around the sans-IO machines,
//! never a second implementation of the protocol.
//!
//! - [`client`]: [`BlockingClient`] connects from an NBD URI (or runs over any
//!   `Read + Write`) and offers `read_at`, `write_at`, `block_status` and friends, plus
//!   `submit_*`/`complete` for many requests in flight.
//! - [`server`]: [`server::serve`] runs one connection over any `Read + Write` on a
//!   [`server::Backend`].

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "client")]
pub use self::client::{errno_of, BlockingClient, CommandError, Completion, NoSink, Sink, Socket};
