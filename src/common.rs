//! Types shared by the client and server machines: what `handle_input` returns, what
//! `poll_transmit` yields, what the machine wants next, and the TLS policy.

use crate::wire::Cookie;

/// What `handle_input` did with the bytes it was
/// given: how many it consumed, and at most one event.
///
/// Events may borrow the input (names, messages, extents): handle the event first, then
/// drop `consumed` bytes from the front of your buffer. `consumed == 0` with no event
/// means the input holds no complete frame yet: read at least as many bytes as
/// [`Want::Bytes`] says and call again.
#[must_use = "the consumed byte count and the event must be acted on"]
#[derive(Debug)]
pub struct Handled<E> {
    /// Bytes consumed from the front of the input.
    pub consumed: usize,
    /// The event these bytes produced, if any.
    pub event: Option<E>,
}

#[allow(dead_code)] // used by the machines
impl<E> Handled<E> {
    pub(crate) fn new(consumed: usize, event: Option<E>) -> Self {
        Self { consumed, event }
    }

    pub(crate) fn none() -> Self {
        Self {
            consumed: 0,
            event: None,
        }
    }
}

/// One unit of output from `poll_transmit`.
#[must_use = "transmits must be sent, in order"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transmit {
    /// `n` bytes were written at the start of the output buffer: send them.
    Bytes(usize),
    /// Send `len` bytes of *your* payload buffer for this cookie now, before anything else:
    /// the data of a write (client) or of a read reply chunk (server) starting at export
    /// offset `offset`. The machine never sees these bytes.
    Payload {
        /// The command the payload belongs to.
        cookie: Cookie,
        /// Export offset of the first payload byte.
        offset: u64,
        /// Number of bytes to send.
        len: usize,
    },
    /// Send `len` zero bytes now (a hole inside a simple read reply, which cannot describe
    /// holes). Keep a static buffer of zeroes for this.
    Zeroes {
        /// The command the bytes belong to.
        cookie: Cookie,
        /// Export offset of the first zero byte.
        offset: u64,
        /// Number of zero bytes to send.
        len: usize,
    },
}

/// What the machine needs next from the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Want {
    /// Call `handle_input` with at least this many buffered bytes (the exact length of the
    /// next header or frame, counted from the first unconsumed byte). A driver that reads
    /// exactly this many never pulls payload into its header buffer.
    Bytes(usize),
    /// Move `len` payload bytes from the transport into your own buffer (the data of a
    /// read reply for a client, of a write for a server), at export offset `offset`, then
    /// call `handle_payload` with the number moved. It may be done in pieces.
    Payload {
        /// The command the payload belongs to.
        cookie: Cookie,
        /// Export offset of the next payload byte.
        offset: u64,
        /// Payload bytes still to move.
        len: usize,
    },
    /// Read `len` bytes from the transport and throw them away (a payload the machine has
    /// already refused, such as the data of a write to a read-only export), then call
    /// `handle_payload` with the number discarded. It may be done in pieces.
    Discard {
        /// Bytes still to discard.
        len: usize,
    },
    /// Nothing is expected from the peer right now (no reply owed, or the session is
    /// over). Bytes that arrive anyway are a protocol violation; end of file is not.
    Nothing,
}

/// How a machine treats TLS (`NBD_OPT_STARTTLS`).
///
/// The machines never do TLS themselves: when it is time, they emit an event telling the
/// caller to wrap its transport, and refuse any byte that arrived in plaintext after the
/// switch point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsPolicy {
    /// No TLS. A server answers `NBD_OPT_STARTTLS` with `NBD_REP_ERR_POLICY`; a client
    /// never sends it.
    #[default]
    Off,
    /// Client: use TLS if the server accepts it, else continue in plaintext. Server:
    /// accept STARTTLS, but do not require it (except for exports the application marks as
    /// TLS-only: the spec's SELECTIVETLS mode).
    Optional,
    /// Client: TLS or nothing; no downgrade. Server: every option other than
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until
    /// TLS is up (FORCEDTLS).
    Required,
}
