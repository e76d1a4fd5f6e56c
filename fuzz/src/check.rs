//! Contract checks shared by every target: the streaming (`Truncated`) contract, the
//! exact-payload contract and the `emit` contract of `src/wire/mod.rs` ("Guarantees").

use std::fmt::Debug;

use nbd_proto::wire::{Error, Result};

/// Feeds `parse` growing prefixes of `data` the way a reader does: start with nothing, and
/// after `Truncated { needed }` read exactly `needed` more bytes. Checks that
///
/// - `needed` is at least 1 (progress), and is never an over-estimate: one byte short of
///   the target the answer is still `Truncated { needed: 1 }` (or a decode error found
///   early), never a success;
/// - where the walk stops, the answer is the one `parse` gives on the whole of `data`: a
///   decoder does not look past the bytes it asked for;
/// - if the walk runs past the end of `data`, `parse(data)` is `Truncated` by exactly the
///   remaining count (or a decode error found early), never a success.
///
/// Returns the value `parse(data)` gives and the prefix length at which the walk first
/// got it (the number of bytes the message takes), or `None` if `parse(data)` fails.
pub fn stream<'a, T: PartialEq + Debug>(
    data: &'a [u8],
    parse: impl Fn(&'a [u8]) -> Result<T>,
) -> Option<(T, usize)> {
    let full = parse(data);
    let mut at = 0;
    loop {
        match parse(&data[..at]) {
            Err(Error::Truncated { needed }) => {
                assert!(needed > 0, "Truncated {{ needed: 0 }} at {at} bytes");
                let target = at.checked_add(needed).expect("needed overflows usize");
                if needed > 1 && target - 1 <= data.len() {
                    match parse(&data[..target - 1]) {
                        Ok(v) => panic!(
                            "Truncated {{ needed: {needed} }} at {at} bytes, but {} bytes \
                             already decode to {v:?}",
                            target - 1
                        ),
                        Err(Error::Truncated { needed: 1 }) => {}
                        Err(e @ Error::Truncated { .. }) => panic!(
                            "Truncated {{ needed: {needed} }} at {at} bytes is not exact: at \
                             {} bytes the answer is {e:?}",
                            target - 1
                        ),
                        Err(_) => {}
                    }
                }
                if target > data.len() {
                    match full {
                        Ok(ref v) => panic!(
                            "Truncated {{ needed: {needed} }} at {at} bytes, but all {} bytes \
                             decode to {v:?}",
                            data.len()
                        ),
                        Err(Error::Truncated { needed: rest }) => assert_eq!(
                            rest,
                            target - data.len(),
                            "at {at} bytes {needed} more were needed; at {} bytes",
                            data.len()
                        ),
                        Err(_) => {}
                    }
                    return None;
                }
                at = target;
            }
            answer => {
                assert_eq!(
                    answer,
                    full,
                    "the answer at {at} bytes (where the decoder stopped asking for more) \
                     differs from the answer on all {} bytes",
                    data.len()
                );
                return full.ok().map(|v| (v, at));
            }
        }
    }
}

/// Decodes with a parser that is given exactly the bytes of a payload whose length the
/// caller knows (`Opt::parse`, `Info::parse`, ...). Such a parser reports a short payload
/// as a length error, never as `Truncated` (a reader would wait for bytes that belong to
/// the next message).
pub fn whole<'a, T: Debug>(data: &'a [u8], parse: impl Fn(&'a [u8]) -> Result<T>) -> Option<T> {
    match parse(data) {
        Err(e @ Error::Truncated { .. }) => {
            panic!(
                "a whole-payload parser answered {e:?} on {} bytes",
                data.len()
            )
        }
        r => r.ok(),
    }
}

/// Encodes with `emit`, checking its contract, and returns the `len` bytes it writes:
///
/// - into `len - 1` bytes: `BufferTooSmall { required: len }`, and nothing written;
/// - into more than `len` bytes: `Ok(len)`, and nothing written past `len`;
/// - every byte of the `len` is written (two different fills give the same output).
pub fn emitted(len: usize, emit: impl Fn(&mut [u8]) -> Result<usize>) -> Vec<u8> {
    if let Some(short) = len.checked_sub(1) {
        let mut buf = vec![0xa5; short];
        assert_eq!(emit(&mut buf), Err(Error::BufferTooSmall { required: len }));
        assert!(buf.iter().all(|&b| b == 0xa5), "a failed emit wrote bytes");
    }
    let mut outs = [0xa5u8, 0x5a].map(|fill| {
        let mut buf = vec![fill; len + 8];
        assert_eq!(emit(&mut buf), Ok(len));
        assert!(
            buf[len..].iter().all(|&b| b == fill),
            "emit wrote past buffer_len() = {len}"
        );
        buf.truncate(len);
        buf
    });
    assert_eq!(outs[0], outs[1], "emit left some bytes unwritten");
    std::mem::take(&mut outs[0])
}

/// Checks a decoded value re-encodes to exactly `data`.
#[track_caller]
pub fn same(out: &[u8], data: &[u8]) {
    assert_eq!(out, data, "re-encoding differs from the bytes decoded");
}
