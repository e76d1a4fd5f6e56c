//! Blocking drivers over `std::io` (feature `std`): thin loops around the sans-IO machines,
//! never a second implementation of the protocol.

pub mod client;

pub use self::client::{errno_of, BlockingClient, CommandError, Completion, NoSink, Sink, Stream};
