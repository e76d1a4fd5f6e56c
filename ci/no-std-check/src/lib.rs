//! Links `nbd-proto` into a `#![no_std]` static library with its own panic handler.
//!
//! If anything in the dependency graph pulls in `std` (a dependency's default features,
//! an `extern crate std` in the crate), `std`'s own `panic_impl` lang item collides with
//! the handler below and rustc stops with E0152 ("found duplicate lang item
//! `panic_impl`"). Build with
//! `cargo build --release --manifest-path ci/no-std-check/Cargo.toml`.
#![no_std]
// `deny`, not `forbid`: the `unsafe_code` lint also covers `#[no_mangle]` (rustc 1.95 flags
// it in edition 2021 too), and the one export below must allow it.
#![deny(unsafe_code)]

use core::panic::PanicInfo;

use nbd_proto::wire::{ExportRequest, InfoList, InfoType, Opt, Request};

static REQUEST: [u8; 28] = [
    0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2,
    0,
];
static INFOS: [InfoType; 1] = [InfoType::BlockSize];

/// Decodes a request header and encodes an `NBD_OPT_GO` (static buffers only); returns
/// the request length plus the option's encoded length, or 0 on any error.
#[allow(unsafe_code)] // `no_mangle` only: the exported symbol name.
#[no_mangle]
pub extern "C" fn nbd_proto_no_std_check() -> u64 {
    let mut out = [0u8; 64];
    let go = Opt::Go(ExportRequest {
        name: "disk",
        infos: InfoList::new(&INFOS),
    });
    match (Request::parse(&REQUEST), go.emit(&mut out)) {
        (Ok(request), Ok(written)) => request.len + written as u64,
        _ => 0,
    }
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}
