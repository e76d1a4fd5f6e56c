//! Adversarial mode: make either machine misbehave on purpose (feature `adversarial`).
//!
//! A protocol implementation is only as good as its behaviour against a peer that breaks
//! the rules. This module turns the crate's own client and server into such peers, the
//! way libnbd's `set_strict_mode` lets its client send what its own checks would refuse,
//! but for both roles and for every message. Our hostile-peer suites
//! (`tests/hostile_server.rs`, `tests/hostile_client.rs`) are built on it, and other NBD
//! implementations can use it to test themselves.
//!
//! # Guarantees
//!
//! - **Off by default, test-only.** Nothing here exists without the `adversarial` feature,
//!   and with it nothing changes until an adversary method is called: the checks are all
//!   on and nothing is injected. Without the feature the hooks compile to nothing (each
//!   relaxable check is written `enforced!(..) && check`, where `enforced!` is the literal
//!   `true`). Never enable the feature in a build that talks to peers you care about.
//! - **Still safe.** A misbehaving machine stays memory-safe and panic-free, and keeps its
//!   own bookkeeping consistent: relaxing a check lets a message out, it never lets a
//!   length overflow or an index go out of bounds. Whatever the peer answers is validated
//!   as usual.
//!
//! # What it can do
//!
//! Each machine has an `adversary()` view ([`Client::adversary`](crate::client::Client::adversary),
//! [`Server::adversary`](crate::server::Server::adversary)) with three kinds of call:
//!
//! 1. **Inject bytes** at a message boundary: [`Message::Raw`] through `inject`. Injected
//!    bytes go out after every message the machine queued before the call and before
//!    every message it queues after it, so they never split one of its own messages.
//! 2. **Send typed but illegal messages** built with the wire codecs: any [`Message`]
//!    (an option in transmission, a chunk for an unknown cookie, a simple reply after
//!    structured replies were negotiated, a header whose length field lies, ...), whole
//!    through `inject` or cut short through `inject_truncated`. The server can then
//!    [`hang_up`](crate::server::ServerAdversary::hang_up) (a truncated header followed
//!    by a close).
//! 3. **Switch off local checks** with `relax`: the client sends requests its own
//!    validation would refuse ([`ClientChecks`]: past the end, unnegotiated flags, write
//!    to a read-only export, ...), the server sends replies its own validation would
//!    refuse ([`ServerChecks`]: overlapping or out-of-range read chunks, ...). The client
//!    also has [`command`](crate::client::ClientAdversary::command), which queues any
//!    command type with exactly the flags given.
//!
//! Injected messages are not tracked: to the machine that injected them they never
//! happened. A reply to an injected request is, to the client, a reply to an unknown
//! cookie; use `relax` or `command` for illegal requests whose replies should be
//! checked and delivered as usual.
//!
//! Memory stays fixed: the client keeps injected bytes in a buffer of
//! [`INJECT_CAPACITY`](crate::client::INJECT_CAPACITY) bytes (32 injections at most)
//! until `poll_transmit` hands them out, the server queues them in its ordinary output
//! buffer (`B` bytes). A full buffer is [`Misuse::TransmitPending`](crate::Misuse):
//! drain, then inject again. Injections still queued when the session closes are dropped.
//!
//! | hostile behaviour | how |
//! | --- | --- |
//! | garbage, bad magic, unknown codes | `inject(&Message::Raw(..))`, `Message::Opt(Opt::Unknown { .. })`, `Message::Request { .. }` with `Command::Unknown(_)` |
//! | a length field that lies (4 GiB, longer or shorter than the data) | `Message::OptHeader`, `Message::OptReplyHeader`, `Message::Chunk` with any `len` |
//! | strings with NUL, bad UTF-8, over 4096 bytes | the `*Header` variants with raw data |
//! | an option in transmission, a request during negotiation | `Message::Opt`, `Message::Request` at any time |
//! | a reply for an unknown cookie, a second completion | `Message::SimpleReply`, `Message::Chunk` |
//! | a simple reply after structured replies | `Message::SimpleReply` |
//! | overlapping, out-of-range, unordered read chunks | server `relax(ServerChecks::READ_CHUNKS)` and `reply_read_data`/`reply_read_hole`, or `Message::Chunk` |
//! | a truncated message, then a close | `inject_truncated`, then the server's `hang_up` (or the driver closes) |
//! | a request past the end, with unnegotiated flags, to a read-only export | client `relax(ClientChecks::BOUNDS \| ..)`, or `command` |
//!
//! # Example
//!
//! A hostile server answers a read with a hole that lies past the end of the request; the
//! client hard-disconnects with the exact rule broken. The two machines are joined by two
//! in-memory pipes (the hidden `pump` moves bytes and answers negotiation).
//!
//! ```
//! use nbd_proto::adversarial::ServerChecks;
//! use nbd_proto::client::{Client, ClientConfig};
//! use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent};
//! use nbd_proto::wire::{CmdFlags, Cookie, TransmissionFlags};
//! use nbd_proto::{Error, Misbehavior, Transmit};
//! # fn pump(client: &mut Client<8>, server: &mut Server<8>) -> Result<Vec<Cookie>, Error> {
//! #     let (mut c2s, mut s2c, mut buf, mut reads) = (Vec::new(), Vec::new(), [0u8; 65536], Vec::new());
//! #     for _ in 0..1000 {
//! #         while let Some(Transmit::Bytes(n)) = client.poll_transmit(&mut buf)? { c2s.extend_from_slice(&buf[..n]); }
//! #         while let Some(Transmit::Bytes(n)) = server.poll_transmit(&mut buf)? { s2c.extend_from_slice(&buf[..n]); }
//! #         let h = server.handle_input(&c2s)?;
//! #         let (used, event) = (h.consumed, h.event.map(|e| format!("{e:?}")));
//! #         match h.event {
//! #             Some(ServerEvent::Export(_)) => server.answer_export(&ExportInfo::new(1 << 20, TransmissionFlags::empty()))?,
//! #             Some(ServerEvent::Request { request, .. }) => reads.push(request.cookie),
//! #             _ => {}
//! #         }
//! #         c2s.drain(..used);
//! #         let h = client.handle_input(&s2c)?;
//! #         let progress = used > 0 || event.is_some() || h.consumed > 0 || h.event.is_some();
//! #         s2c.drain(..h.consumed);
//! #         if !progress { break; }
//! #     }
//! #     Ok(reads)
//! # }
//!
//! let mut client: Client<8> = Client::new(&ClientConfig::new(""))?;
//! let mut server: Server<8> = Server::new(ServerConfig::default());
//! pump(&mut client, &mut server)?; // handshake
//!
//! let read = client.read(0, 4096, CmdFlags::empty())?;
//! assert_eq!(pump(&mut client, &mut server)?, [read]);
//!
//! // The server's own checks would refuse a piece outside the request: switch them off.
//! server.adversary().relax(ServerChecks::READ_CHUNKS);
//! server.reply_read_hole(read, 8192, 512)?;
//!
//! let error = pump(&mut client, &mut server).unwrap_err();
//! assert_eq!(
//!     error,
//!     Error::PeerMisbehaved(Misbehavior::ChunkOutOfRange { cookie: read, offset: 8192, len: 512 })
//! );
//! # Ok::<(), Error>(())
//! ```

use crate::wire::{
    self, ChunkHeader, ClientFlags, ExportNameReply, Greeting, OldstyleHello, Opt, OptCode,
    OptHeader, OptReply, OptReplyHeader, Request, SimpleReply,
};

pub use crate::client::ClientAdversary;
pub use crate::server::ServerAdversary;

crate::wire::flags::flags! {
    /// Client-side checks that adversarial mode can switch off (all on by default). With a
    /// check off, the command methods (`read`, `write`, `trim`, ...) queue requests the
    /// check would have refused, and track them as usual.
    ///
    /// What is never relaxed: the machine's state (no command before transmission), the
    /// in-flight table's capacity, and what the wire cannot express (a length over 32
    /// bits in a compact request).
    pub struct ClientChecks(u16) {
        /// The export supports the command: `NBD_CMD_FLUSH`, `TRIM`, `WRITE_ZEROES` and
        /// `CACHE` need their transmission flags, `BLOCK_STATUS` a negotiated context.
        const COMMANDS = 1 << 0;
        /// Command flags are valid for the command and negotiated (`FUA`, `DF`,
        /// `FAST_ZERO`, ...).
        const FLAGS = 1 << 1;
        /// No `WRITE`, `TRIM` or `WRITE_ZEROES` to a read-only export.
        const READ_ONLY = 1 << 2;
        /// The range is not empty, does not overflow and lies inside the export.
        const BOUNDS = 1 << 3;
        /// Offsets and lengths are multiples of the minimum block size, and reads and
        /// writes stay within the maximum payload.
        const BLOCK_SIZE = 1 << 4;
        /// Manual-mode options respect the protocol's preconditions: fixed newstyle for
        /// anything but `EXPORT_NAME` and `ABORT`, no `EXPORT_NAME` after extended headers,
        /// no second `STARTTLS`, no `SET_META_CONTEXT` before structured replies. (One
        /// option at a time stays enforced.)
        const OPTIONS = 1 << 5;
    }
}

crate::wire::flags::flags! {
    /// Server-side checks on the application's replies that adversarial mode can switch
    /// off (all on by default). With a check off, the `reply_*` and `answer_*` methods
    /// frame what they are given even though the spec forbids it.
    ///
    /// What is never relaxed: a piece must not be empty and its range must not overflow,
    /// and the machine's own bookkeeping (owed replies, selected contexts) stays bounded.
    pub struct ServerChecks(u16) {
        /// Read pieces (`reply_read_data`, `reply_read_hole`) continue where the last one
        /// ended, lie inside the request, and a `DF` read gets a single piece. Relaxed,
        /// pieces may overlap, leave gaps, come out of order or lie outside the request;
        /// `NBD_REPLY_FLAG_DONE` is still set on the piece that ends at the request's end.
        const READ_CHUNKS = 1 << 0;
        /// The offset of `reply_error_at` lies inside the request, for a command that
        /// allows `NBD_REPLY_TYPE_ERROR_OFFSET`.
        const ERROR_OFFSET = 1 << 1;
        /// `answer_export` sends the export's transmission flags and block sizes only if
        /// valid: `HAS_FLAGS` added, `SEND_DF`,
        /// `BLOCK_STATUS_PAYLOAD`, `SEND_FAST_ZERO` and `SEND_RESIZE` dropped where the
        /// negotiation forbids them, block sizes checked. Relaxed, flags go out verbatim
        /// and block sizes unchecked (and are then enforced as given).
        const EXPORT_INFO = 1 << 2;
        /// `answer_meta_context` refuses names without a namespace and reused context IDs.
        const META_CONTEXTS = 1 << 3;
    }
}

/// A message to inject, built with the wire codecs, for either direction. Most variants
/// encode a well-formed message of the codec's type; the `*Header` and `Chunk` variants
/// pair a header with arbitrary data, so that their length fields can lie and their
/// contents can break any rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message<'a> {
    /// Bytes sent exactly as given.
    Raw(&'a [u8]),

    // ---- what a server sends ----
    /// A newstyle greeting, with any handshake flags.
    Greeting(Greeting),
    /// An oldstyle hello, with any flags.
    OldstyleHello(OldstyleHello),
    /// An option reply, encoded by [`OptReply::emit`] (the string rules still apply: use
    /// [`Message::OptReplyHeader`] to break them).
    OptReply {
        /// The option it claims to answer.
        opt: OptCode,
        /// The reply.
        reply: OptReply<'a>,
    },
    /// An option reply header, whose length need not match `data`, then `data` as given.
    OptReplyHeader {
        /// The header (any option, reply type and length).
        header: OptReplyHeader,
        /// The bytes that follow it.
        data: &'a [u8],
    },
    /// The reply to `NBD_OPT_EXPORT_NAME`, with or without padding.
    ExportNameReply(ExportNameReply),
    /// A simple reply header (read data, if any, follows as a separate injection).
    SimpleReply(SimpleReply),
    /// A structured or extended chunk header, whose length need not match `payload`,
    /// then `payload` as given (build it with the [`wire::chunk`] codecs).
    Chunk {
        /// The header (any flags, type, cookie, offset and length).
        header: ChunkHeader,
        /// The bytes that follow it.
        payload: &'a [u8],
    },

    // ---- what a client sends ----
    /// Client flags, any bits.
    ClientFlags(ClientFlags),
    /// An option request, encoded by [`Opt::emit`] (`Opt::Unknown` carries any code and
    /// data).
    Opt(Opt<'a>),
    /// An option header, whose length need not match `data`, then `data` as given.
    OptHeader {
        /// The header (any option and length).
        header: OptHeader,
        /// The bytes that follow it.
        data: &'a [u8],
    },
    /// A request header (compact or extended, any command, flags, cookie, offset and
    /// length), then `payload` as given (a write's data, a block-status payload, or
    /// nothing).
    Request {
        /// The header.
        request: Request,
        /// The bytes that follow it.
        payload: &'a [u8],
    },
}

impl Message<'_> {
    /// Length of the encoding.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Raw(b) => b.len(),
            Self::Greeting(g) => g.buffer_len(),
            Self::OldstyleHello(h) => h.buffer_len(),
            Self::OptReply { reply, .. } => reply.buffer_len(),
            Self::OptReplyHeader { data, .. } => OptReplyHeader::LEN + data.len(),
            Self::ExportNameReply(r) => r.buffer_len(),
            Self::SimpleReply(_) => SimpleReply::LEN,
            Self::Chunk { header, payload } => header.buffer_len() + payload.len(),
            Self::ClientFlags(f) => f.buffer_len(),
            Self::Opt(o) => o.buffer_len(),
            Self::OptHeader { data, .. } => OptHeader::LEN + data.len(),
            Self::Request { request, payload } => request.buffer_len() + payload.len(),
        }
    }

    /// Encodes into `buf`, returning the bytes written ([`buffer_len`](Self::buffer_len)).
    /// Fails only where the codecs cannot express the value (a string over 4096 bytes in
    /// a typed variant, a length over 32 bits in a compact header) or `buf` is too short.
    pub fn emit(&self, buf: &mut [u8]) -> wire::Result<usize> {
        let len = self.buffer_len();
        wire::room(buf, len)?;
        let (at, tail): (usize, &[u8]) = match self {
            Self::Raw(b) => (0, b),
            Self::Greeting(g) => (g.emit(buf)?, &[]),
            Self::OldstyleHello(h) => (h.emit(buf)?, &[]),
            Self::OptReply { opt, reply } => (reply.emit(*opt, buf)?, &[]),
            Self::OptReplyHeader { header, data } => (header.emit(buf)?, data),
            Self::ExportNameReply(r) => (r.emit(buf)?, &[]),
            Self::SimpleReply(r) => (r.emit(buf)?, &[]),
            Self::Chunk { header, payload } => (header.emit(buf)?, payload),
            Self::ClientFlags(f) => (f.emit(buf)?, &[]),
            Self::Opt(o) => (o.emit(buf)?, &[]),
            Self::OptHeader { header, data } => (header.emit(buf)?, data),
            Self::Request { request, payload } => (request.emit(buf)?, payload),
        };
        // invariant: room() checked `len` bytes, and at + tail.len() == len.
        buf[at..len].copy_from_slice(tail);
        Ok(len)
    }

    /// The encoding in a new vector.
    #[cfg(feature = "alloc")]
    #[allow(unused_qualifications)] // `std` is the real one in unit tests, not no-std-compat
    pub fn to_vec(&self) -> wire::Result<std::vec::Vec<u8>> {
        let mut v = std::vec![0; self.buffer_len()];
        self.emit(&mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::{ChunkType, CmdFlags, Command, Cookie, ReplyFlags};

    #[test]
    fn headers_may_lie_about_their_length() {
        let m = Message::Chunk {
            header: ChunkHeader {
                flags: ReplyFlags::DONE,
                chunk_type: ChunkType::OffsetHole,
                cookie: Cookie(7),
                offset: None,
                len: u32::MAX.into(),
            },
            payload: &[1, 2, 3],
        };
        assert_eq!(m.buffer_len(), 23);
        let mut v = [0u8; 23];
        assert_eq!(m.emit(&mut v), Ok(23));
        assert_eq!(&v[16..20], &[0xff; 4]);
        assert_eq!(&v[20..], &[1, 2, 3]);
        let r = Message::Request {
            request: Request {
                flags: CmdFlags::empty(),
                command: Command::Write,
                cookie: Cookie(1),
                offset: 0,
                len: 1 << 20,
                extended: false,
            },
            payload: b"abc",
        };
        let mut v = [0u8; 31];
        assert_eq!(r.emit(&mut v), Ok(31));
        assert_eq!(&v[28..], b"abc");
    }

    #[test]
    fn what_the_wire_cannot_express_is_an_error_not_a_panic() {
        let m = Message::Chunk {
            header: ChunkHeader {
                flags: ReplyFlags::empty(),
                chunk_type: ChunkType::OffsetData,
                cookie: Cookie(1),
                offset: None,
                len: 1 << 32,
            },
            payload: &[],
        };
        let mut buf = [0u8; 20];
        assert!(matches!(
            m.emit(&mut buf),
            Err(wire::Error::BadLength { .. })
        ));
        let mut short = [0u8; 3];
        assert_eq!(
            Message::Raw(b"abcd").emit(&mut short),
            Err(wire::Error::BufferTooSmall { required: 4 })
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u16),
        Write(u64, u16),
        Command(u16, u16, u64, u64),
        Relax(u16),
        Enforce(u16),
        Inject(Vec<u8>),
        InjectTruncated(Vec<u8>, usize),
        ServerRelax(u16),
        ServerInject(Vec<u8>),
        ServerHangUp,
        /// A read piece for the first held read, anywhere.
        Piece(u64, u32, bool),
        /// An error at any offset for the first held request.
        ErrorAt(u64),
        Release,
        Drive,
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![0u64..(2 << 20), Just(u64::MAX - 100)];
        let bytes = proptest::collection::vec(any::<u8>(), 0..80);
        prop_oneof![
            (offset.clone(), any::<u16>()).prop_map(|(o, l)| Op::Read(o, l)),
            (offset.clone(), any::<u16>()).prop_map(|(o, l)| Op::Write(o, l)),
            (0u16..10, any::<u16>(), offset, 0u64..(1 << 20))
                .prop_map(|(c, f, o, l)| Op::Command(c, f, o, l)),
            any::<u16>().prop_map(Op::Relax),
            any::<u16>().prop_map(Op::Enforce),
            bytes.clone().prop_map(Op::Inject),
            (bytes.clone(), 0usize..100).prop_map(|(b, n)| Op::InjectTruncated(b, n)),
            any::<u16>().prop_map(Op::ServerRelax),
            bytes.prop_map(Op::ServerInject),
            Just(Op::ServerHangUp),
            (0u64..(1 << 20), 0u32..70_000, any::<bool>()).prop_map(|(o, l, h)| Op::Piece(o, l, h)),
            prop_oneof![0u64..(1 << 20), Just(u64::MAX)].prop_map(Op::ErrorAt),
            Just(Op::Release),
            Just(Op::Drive),
        ]
    }

    proptest::proptest! {
        /// Whatever the adversary does on either side, neither machine panics, the
        /// pair settles, and a machine that died stays dead with the same error.
        #[test]
        fn adversarial_sessions_never_panic(
            ops in proptest::collection::vec(op(), 0..25),
            form in 0u8..3,
            held in any::<bool>(),
        ) {
            use crate::client::ClientConfig;
            use crate::server::ServerConfig;
            use crate::testing::Pair;

            let mut config = ClientConfig::new("");
            config.structured_replies = form > 0;
            config.extended_headers = form > 1;
            config.meta_contexts = &["base:allocation"];
            let mut p = Pair::new(&config, ServerConfig::default(), 1 << 20);
            p.drive();
            if held {
                p.replies = crate::testing::Replies::Held;
            }
            for op in ops {
                let _ = match op {
                    Op::Read(o, l) => p.read(o, l.into(), CmdFlags::empty()).map(drop),
                    Op::Write(o, l) => p.write(o, &std::vec![1; l.into()], CmdFlags::empty()).map(drop),
                    Op::Command(c, f, o, l) => p
                        .client
                        .adversary()
                        .command(Command::from(c), CmdFlags::from_bits(f), o, l)
                        .map(drop),
                    Op::Relax(c) => {
                        p.client.adversary().relax(ClientChecks::from_bits(c));
                        Ok(())
                    }
                    Op::Enforce(c) => {
                        p.client.adversary().enforce(ClientChecks::from_bits(c));
                        Ok(())
                    }
                    Op::Inject(b) => p.client.adversary().inject(&Message::Raw(&b)),
                    Op::InjectTruncated(b, n) => {
                        p.client.adversary().inject_truncated(&Message::Raw(&b), n)
                    }
                    Op::ServerRelax(c) => {
                        p.server.adversary().relax(ServerChecks::from_bits(c));
                        Ok(())
                    }
                    Op::ServerInject(b) => p.server.adversary().inject(&Message::Raw(&b)),
                    Op::ServerHangUp => p.server.adversary().hang_up(),
                    Op::Piece(o, l, hole) => {
                        let read = p.held().iter().find(|r| r.command == Command::Read);
                        match read.map(|r| r.cookie) {
                            Some(c) if hole => p.server.reply_read_hole(c, o, l.into()),
                            Some(c) => p.server.reply_read_data(c, o, l as usize),
                            None => Ok(()),
                        }
                    }
                    Op::ErrorAt(o) => match p.held().first().map(|r| r.cookie) {
                        Some(c) => p.server.reply_error_at(c, crate::Errno::Io, "", o),
                        None => Ok(()),
                    },
                    Op::Release => {
                        p.release();
                        Ok(())
                    }
                    Op::Drive => {
                        p.drive();
                        Ok(())
                    }
                };
            }
            p.drive();
            if let Some(e) = p.client.error() {
                proptest::prop_assert_eq!(p.client.handle_input(b"x").unwrap_err(), e);
                let mut n = 0;
                while p.client.poll_event().is_some() {
                    n += 1;
                    proptest::prop_assert!(n <= 64);
                }
            }
            if let Some(e) = p.server.error() {
                proptest::prop_assert_eq!(p.server.handle_input(b"x").unwrap_err(), e);
            }
        }
    }

    #[test]
    fn checks_start_empty_and_name_themselves() {
        assert!(ClientChecks::default().is_empty());
        assert_eq!(
            format!("{}", ClientChecks::BOUNDS | ClientChecks::FLAGS),
            "FLAGS | BOUNDS"
        );
        assert_eq!(
            format!("{:?}", ServerChecks::READ_CHUNKS),
            "ServerChecks(READ_CHUNKS)"
        );
    }
}
