//! A sans-IO implementation of the NBD (Network Block Device) protocol.
// Unit tests link the real `std` (proptest needs it); every other build is `no_std`, with
// `no-std-compat` standing in for `std` so that paths read the same in both.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![cfg_attr(not(fuzzing), deny(missing_docs))]
#![warn(unreachable_pub, elided_lifetimes_in_paths, unused_qualifications)]

#[cfg(not(test))]
extern crate no_std_compat as std;

#[cfg(feature = "std")]
pub mod blocking;
pub mod client;
mod common;
pub mod error;
#[cfg(feature = "alloc")]
pub mod uri;
pub mod wire;

pub use common::{Handled, TlsPolicy, Transmit, Want};
pub use error::{Error, Incompatible, Misbehavior, Misuse};
pub use wire::{Cookie, Errno};
