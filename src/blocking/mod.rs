//! Blocking drivers over `std::io` (feature `std`): thin loops over the state machines.

pub mod server;
