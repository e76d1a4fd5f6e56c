//! Transmission requests (proto.md "Request message"), compact and extended, and the
//! payload form of `NBD_CMD_BLOCK_STATUS`.
//!
//! ```text
//! Compact (28 bytes):                 Extended (32 bytes, extended headers only):
//! C: 32 bits 0x25609513 (magic)      C: 32 bits 0x21e41c71 (magic)
//!    16 bits command flags              16 bits command flags
//!    16 bits type                       16 bits type
//!    64 bits cookie                     64 bits cookie
//!    64 bits offset                     64 bits offset
//!    32 bits length                     64 bits length
//!    length bytes of data (WRITE)       length bytes of payload (iff PAYLOAD_LEN)
//!
//! NBD_CMD_BLOCK_STATUS payload (extended, PAYLOAD_LEN set, length = 8 + 4n):
//!    64 bits effect length
//!    n * 32 bits metadata context IDs
//! ```
//!
//! The request header is decoded by its magic, so one parser reads both forms; whether
//! the form is the negotiated one is for the state machine to decide. Payload bytes are
//! never part of a [`Request`]: they pass beside it.

use core::fmt;

use byteorder::{ByteOrder, NetworkEndian};

use super::{
    enum_with_unknown, need, room, CmdFlags, Cookie, Error, Field, Result, EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
};

enum_with_unknown! {
    /// A command type (`NBD_CMD_*`, 16 bits).
    pub enum Command(u16) {
        /// `NBD_CMD_READ` (0): read `length` bytes at `offset`.
        Read = 0, "NBD_CMD_READ",
        /// `NBD_CMD_WRITE` (1): write the `length`-byte payload at `offset`.
        Write = 1, "NBD_CMD_WRITE",
        /// `NBD_CMD_DISC` (2): soft disconnect; no reply.
        Disc = 2, "NBD_CMD_DISC",
        /// `NBD_CMD_FLUSH` (3): make completed writes durable.
        Flush = 3, "NBD_CMD_FLUSH",
        /// `NBD_CMD_TRIM` (4): discard (advisory).
        Trim = 4, "NBD_CMD_TRIM",
        /// `NBD_CMD_CACHE` (5): prefetch (advisory).
        Cache = 5, "NBD_CMD_CACHE",
        /// `NBD_CMD_WRITE_ZEROES` (6): write zeroes without a payload.
        WriteZeroes = 6, "NBD_CMD_WRITE_ZEROES",
        /// `NBD_CMD_BLOCK_STATUS` (7): query metadata contexts.
        BlockStatus = 7, "NBD_CMD_BLOCK_STATUS",
        /// `NBD_CMD_RESIZE` (8): resize the export (experimental extension).
        Resize = 8, "NBD_CMD_RESIZE",
    }
}

impl Command {
    /// True for the commands whose errors may carry an offset
    /// (`NBD_REPLY_TYPE_ERROR_OFFSET`): READ, WRITE, TRIM, CACHE, WRITE_ZEROES and
    /// BLOCK_STATUS (proto.md).
    pub fn allows_error_offset(self) -> bool {
        matches!(
            self,
            Self::Read
                | Self::Write
                | Self::Trim
                | Self::Cache
                | Self::WriteZeroes
                | Self::BlockStatus
        )
    }
}

mod field {
    use super::Field;
    pub(super) const MAGIC: Field = 0..4;
    pub(super) const FLAGS: Field = 4..6;
    pub(super) const TYPE: Field = 6..8;
    pub(super) const COOKIE: Field = 8..16;
    pub(super) const OFFSET: Field = 16..24;
    pub(super) const LENGTH_32: Field = 24..28;
    pub(super) const LENGTH_64: Field = 24..32;
}

/// A request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Command flags.
    pub flags: CmdFlags,
    /// Command type.
    pub command: Command,
    /// The client's cookie, echoed in every reply.
    pub cookie: Cookie,
    /// Offset into the export.
    pub offset: u64,
    /// Length: the data length (compact), or the payload length when `PAYLOAD_LEN` is set
    /// or the effect length otherwise (extended).
    pub len: u64,
    /// True for the 32-byte extended form (magic `0x21e41c71`, 64-bit length).
    pub extended: bool,
}

impl Request {
    /// Length of a compact header.
    pub const COMPACT_LEN: usize = 28;
    /// Length of an extended header.
    pub const EXTENDED_LEN: usize = 32;

    /// Decodes a header from the start of `buf`, compact or extended by its magic.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, 4)?;
        let extended = match NetworkEndian::read_u32(&buf[field::MAGIC]) {
            REQUEST_MAGIC => false,
            EXTENDED_REQUEST_MAGIC => true,
            found => {
                return Err(Error::BadMagic {
                    what: "NBD_REQUEST_MAGIC or NBD_EXTENDED_REQUEST_MAGIC",
                    found: found.into(),
                })
            }
        };
        need(
            buf,
            if extended {
                Self::EXTENDED_LEN
            } else {
                Self::COMPACT_LEN
            },
        )?;
        Ok(Self {
            flags: CmdFlags::from_bits(NetworkEndian::read_u16(&buf[field::FLAGS])),
            command: Command::from(NetworkEndian::read_u16(&buf[field::TYPE])),
            cookie: Cookie(NetworkEndian::read_u64(&buf[field::COOKIE])),
            offset: NetworkEndian::read_u64(&buf[field::OFFSET]),
            len: if extended {
                NetworkEndian::read_u64(&buf[field::LENGTH_64])
            } else {
                NetworkEndian::read_u32(&buf[field::LENGTH_32]).into()
            },
            extended,
        })
    }

    /// Length of the header (28 or 32).
    pub fn buffer_len(&self) -> usize {
        if self.extended {
            Self::EXTENDED_LEN
        } else {
            Self::COMPACT_LEN
        }
    }

    /// Number of payload bytes that follow this header on the wire: the length of an
    /// `NBD_CMD_WRITE`, or of an extended request with `NBD_CMD_FLAG_PAYLOAD_LEN`; zero
    /// otherwise.
    ///
    /// With extended headers the spec requires `PAYLOAD_LEN` on every write, but QEMU 10's
    /// client omits it (its server tolerates that, as does this crate's): a write always
    /// carries its data, so it is counted with or without the flag.
    pub fn payload_len(&self) -> u64 {
        let has_payload = self.command == Command::Write
            || (self.extended && self.flags.contains(CmdFlags::PAYLOAD_LEN));
        if has_payload {
            self.len
        } else {
            0
        }
    }

    /// Encodes into `buf`, returning the bytes written. A compact header cannot carry a
    /// length over 32 bits.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        if self.extended {
            NetworkEndian::write_u32(&mut buf[field::MAGIC], EXTENDED_REQUEST_MAGIC);
            NetworkEndian::write_u64(&mut buf[field::LENGTH_64], self.len);
        } else {
            let short = u32::try_from(self.len).map_err(|_| Error::BadLength {
                what: "compact request length over 32 bits",
                len: self.len,
            })?;
            NetworkEndian::write_u32(&mut buf[field::MAGIC], REQUEST_MAGIC);
            NetworkEndian::write_u32(&mut buf[field::LENGTH_32], short);
        }
        NetworkEndian::write_u16(&mut buf[field::FLAGS], self.flags.bits());
        NetworkEndian::write_u16(&mut buf[field::TYPE], self.command.into());
        NetworkEndian::write_u64(&mut buf[field::COOKIE], self.cookie.0);
        NetworkEndian::write_u64(&mut buf[field::OFFSET], self.offset);
        Ok(len)
    }
}

/// The payload of an extended `NBD_CMD_BLOCK_STATUS` with `NBD_CMD_FLAG_PAYLOAD_LEN`: the
/// effect length and the context IDs to report on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusPayload<'a> {
    /// How many bytes the client wants described (the header's length is the payload's).
    pub effect_len: u64,
    /// Context IDs to report on. The codec accepts an empty list; whether that is valid is
    /// the server's decision (qemu-nbd answers it with `NBD_EINVAL`).
    pub ids: ContextIds<'a>,
}

impl<'a> BlockStatusPayload<'a> {
    /// Decodes a payload of exactly `8 + 4n` bytes.
    pub fn parse(payload: &'a [u8]) -> Result<Self> {
        if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(4) {
            return Err(Error::BadLength {
                what: "NBD_CMD_BLOCK_STATUS payload must be 8 + 4n bytes",
                len: payload.len() as u64,
            });
        }
        Ok(Self {
            effect_len: NetworkEndian::read_u64(&payload[..8]),
            ids: ContextIds(IdsInner::Wire(&payload[8..])),
        })
    }

    /// Length of the encoding.
    pub fn buffer_len(&self) -> usize {
        8 + 4 * self.ids.len()
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        room(buf, len)?;
        NetworkEndian::write_u64(&mut buf[..8], self.effect_len);
        for (i, id) in self.ids.iter().enumerate() {
            NetworkEndian::write_u32(&mut buf[8 + 4 * i..12 + 4 * i], id);
        }
        Ok(len)
    }
}

/// A list of metadata context IDs: decoded wire bytes or a caller's slice. Compares equal by
/// content.
#[derive(Clone, Copy)]
pub struct ContextIds<'a>(IdsInner<'a>);

#[derive(Clone, Copy)]
enum IdsInner<'a> {
    /// 4 bytes per ID (length checked at parse).
    Wire(&'a [u8]),
    Ids(&'a [u32]),
}

impl<'a> ContextIds<'a> {
    /// A list to send.
    pub const fn new(ids: &'a [u32]) -> Self {
        Self(IdsInner::Ids(ids))
    }

    /// Number of IDs.
    pub fn len(&self) -> usize {
        match self.0 {
            IdsInner::Wire(b) => b.len() / 4,
            IdsInner::Ids(i) => i.len(),
        }
    }

    /// True if the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The IDs, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + Clone + 'a {
        let this = *self;
        (0..self.len()).map(move |i| match this.0 {
            IdsInner::Wire(b) => NetworkEndian::read_u32(&b[4 * i..4 * i + 4]),
            IdsInner::Ids(ids) => ids[i],
        })
    }
}

impl PartialEq for ContextIds<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}
impl Eq for ContextIds<'_> {}

impl fmt::Debug for ContextIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use proptest::prelude::*;

    fn emitted(r: &Request) -> Vec<u8> {
        let mut buf = vec![0xa5; r.buffer_len()];
        assert_eq!(r.emit(&mut buf), Ok(buf.len()));
        buf
    }

    // spec-digest 7 vectors.
    static READ: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0,
        0, 2, 0,
    ];
    static WRITE_FUA: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 4,
    ];
    static EXT_WRITE: [u8; 32] = [
        0x21, 0xe4, 0x1c, 0x71, 0, 0x20, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 4,
    ];
    static EXT_TRIM: [u8; 32] = [
        0x21, 0xe4, 0x1c, 0x71, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 2, 0, 0, 0, 0,
    ];
    static DISC: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ];
    static EXT_BLOCK_STATUS: [u8; 44] = [
        0x21, 0xe4, 0x1c, 0x71, 0, 0x20, 0, 7, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 1,
    ];

    fn req(
        command: Command,
        flags: CmdFlags,
        cookie: u64,
        offset: u64,
        len: u64,
        extended: bool,
    ) -> Request {
        Request {
            flags,
            command,
            cookie: Cookie(cookie),
            offset,
            len,
            extended,
        }
    }

    #[test]
    fn vectors() {
        let cases: [(&[u8], Request); 5] = [
            (
                &READ,
                req(
                    Command::Read,
                    CmdFlags::empty(),
                    0x0102030405060708,
                    4096,
                    512,
                    false,
                ),
            ),
            (
                &WRITE_FUA,
                req(Command::Write, CmdFlags::FUA, 2, 0, 4, false),
            ),
            (
                &EXT_WRITE,
                req(Command::Write, CmdFlags::PAYLOAD_LEN, 3, 0, 4, true),
            ),
            (
                &EXT_TRIM,
                req(Command::Trim, CmdFlags::empty(), 4, 0, 1 << 33, true),
            ),
            (&DISC, req(Command::Disc, CmdFlags::empty(), 5, 0, 0, false)),
        ];
        for (bytes, r) in cases {
            assert_eq!(Request::parse(bytes), Ok(r));
            assert_eq!(emitted(&r), bytes);
        }
        assert_eq!(Request::parse(&WRITE_FUA).unwrap().payload_len(), 4);
        assert_eq!(Request::parse(&EXT_WRITE).unwrap().payload_len(), 4);
        assert_eq!(Request::parse(&EXT_TRIM).unwrap().payload_len(), 0);
        assert_eq!(Request::parse(&READ).unwrap().payload_len(), 0);
        // An extended write without PAYLOAD_LEN (as QEMU 10 sends) still carries its data.
        let qemu = req(Command::Write, CmdFlags::FUA, 9, 0, 512, true);
        assert_eq!(qemu.payload_len(), 512);
        // PAYLOAD_LEN in a compact header is meaningless: no payload.
        let compact = req(Command::Read, CmdFlags::PAYLOAD_LEN, 9, 0, 512, false);
        assert_eq!(compact.payload_len(), 0);
    }

    #[test]
    fn block_status_payload_vector() {
        let r = Request::parse(&EXT_BLOCK_STATUS).unwrap();
        assert_eq!(
            r,
            req(Command::BlockStatus, CmdFlags::PAYLOAD_LEN, 6, 0, 12, true)
        );
        assert_eq!(r.payload_len(), 12);
        let p = BlockStatusPayload::parse(&EXT_BLOCK_STATUS[32..]).unwrap();
        assert_eq!(p.effect_len, 8192);
        assert_eq!(p.ids.iter().collect::<Vec<_>>(), [1]);
        assert_eq!(
            p,
            BlockStatusPayload {
                effect_len: 8192,
                ids: ContextIds::new(&[1])
            }
        );
        let mut out = [0xa5; 12];
        assert_eq!(p.emit(&mut out), Ok(12));
        assert_eq!(out, EXT_BLOCK_STATUS[32..]);
        for bad in [&[0u8; 7][..], &[0; 9], &[0; 14]] {
            assert!(matches!(
                BlockStatusPayload::parse(bad),
                Err(Error::BadLength { .. })
            ));
        }
        assert!(BlockStatusPayload::parse(&[0; 8]).unwrap().ids.is_empty());
    }

    #[test]
    fn truncated_prefixes() {
        for k in 0..28 {
            let want = if k < 4 { 4 - k } else { 28 - k };
            assert_eq!(
                Request::parse(&READ[..k]),
                Err(Error::Truncated { needed: want })
            );
        }
        for k in 4..32 {
            assert_eq!(
                Request::parse(&EXT_TRIM[..k]),
                Err(Error::Truncated { needed: 32 - k })
            );
        }
    }

    #[test]
    fn bad_magic_and_long_compact() {
        let mut b = READ;
        b[0] = 0x67;
        assert!(matches!(Request::parse(&b), Err(Error::BadMagic { .. })));
        let r = req(Command::Trim, CmdFlags::empty(), 1, 0, 1 << 32, false);
        let mut out = [0u8; 28];
        assert!(matches!(r.emit(&mut out), Err(Error::BadLength { .. })));
        assert_eq!(
            r.emit(&mut out[..27]),
            Err(Error::BufferTooSmall { required: 28 })
        );
        assert_eq!(Command::from(99), Command::Unknown(99));
        assert_eq!(Command::Resize.to_string(), "NBD_CMD_RESIZE");
    }

    proptest! {
        #[test]
        fn request_roundtrip(r in request()) {
            let bytes = emitted(&r);
            prop_assert_eq!(Request::parse(&bytes), Ok(r));
        }

        #[test]
        fn request_arbitrary_bytes(bytes in magic_prefixed(&[REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC], 40)) {
            if let Ok(r) = Request::parse(&bytes) {
                prop_assert_eq!(emitted(&r), &bytes[..r.buffer_len()]);
            }
        }

        #[test]
        fn block_status_payload_roundtrip(effect in any::<u64>(), ids in prop::collection::vec(any::<u32>(), 0..20)) {
            let p = BlockStatusPayload { effect_len: effect, ids: ContextIds::new(&ids) };
            let mut out = vec![0; p.buffer_len()];
            p.emit(&mut out).unwrap();
            prop_assert_eq!(BlockStatusPayload::parse(&out), Ok(p));
        }
    }
}
