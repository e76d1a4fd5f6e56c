//! The first bytes of a session: oldstyle hello, newstyle greeting and client flags
//! (proto.md "Handshake", "Oldstyle negotiation", "Newstyle negotiation").
//!
//! ```text
//! Oldstyle, S: 64 bits  NBDMAGIC (0x4e42444d41474943)
//!              64 bits  cliserv_magic (0x00420281861253)
//!              64 bits  export size
//!              16 bits  handshake flags (always 0)
//!              16 bits  transmission flags
//!             124 bytes zeroes (reserved)
//! Newstyle, S: 64 bits  NBDMAGIC
//!              64 bits  IHAVEOPT (0x49484156454F5054)
//!              16 bits  handshake flags
//!           C: 32 bits  client flags
//! ```

use byteorder::{ByteOrder, NetworkEndian};

use super::{
    need, room, ClientFlags, Error, Field, HandshakeFlags, Result, TransmissionFlags, NBD_MAGIC,
    OLDSTYLE_MAGIC, OPTS_MAGIC, ZERO_PAD_LEN,
};

mod field {
    use super::Field;
    pub(super) const MAGIC: Field = 0..8;
    pub(super) const STYLE: Field = 8..16;
    // Newstyle greeting.
    pub(super) const HANDSHAKE_FLAGS: Field = 16..18;
    // Oldstyle hello.
    pub(super) const SIZE: Field = 16..24;
    pub(super) const OLD_HANDSHAKE_FLAGS: Field = 24..26;
    pub(super) const OLD_TRANSMISSION_FLAGS: Field = 26..28;
    pub(super) const OLD_ZEROES: Field = 28..152;
}

/// What a server sends first: an oldstyle hello or a newstyle greeting.
///
/// A client cannot know which until it has the first 16 bytes, so it parses this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// Oldstyle: export size and flags, then straight to transmission.
    Oldstyle(OldstyleHello),
    /// Newstyle: handshake flags, then option haggling.
    Newstyle(Greeting),
}

impl Hello {
    /// Bytes needed to tell the two styles apart.
    pub const PREFIX_LEN: usize = 16;

    /// Decodes the server's first message.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::PREFIX_LEN)?;
        check_magic(buf)?;
        match NetworkEndian::read_u64(&buf[field::STYLE]) {
            OPTS_MAGIC => Greeting::parse(buf).map(Self::Newstyle),
            OLDSTYLE_MAGIC => OldstyleHello::parse(buf).map(Self::Oldstyle),
            found => Err(Error::BadMagic {
                what: "IHAVEOPT or cliserv_magic",
                found,
            }),
        }
    }

    /// Length of the encoding: 18 (newstyle) or 152 (oldstyle).
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Oldstyle(h) => h.buffer_len(),
            Self::Newstyle(g) => g.buffer_len(),
        }
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        match self {
            Self::Oldstyle(h) => h.emit(buf),
            Self::Newstyle(g) => g.emit(buf),
        }
    }
}

fn check_magic(buf: &[u8]) -> Result<()> {
    match NetworkEndian::read_u64(&buf[field::MAGIC]) {
        NBD_MAGIC => Ok(()),
        found => Err(Error::BadMagic {
            what: "NBDMAGIC",
            found,
        }),
    }
}

/// The newstyle greeting (18 bytes): `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags offered by the server (unknown bits kept; clients ignore them).
    pub flags: HandshakeFlags,
}

impl Greeting {
    /// Length on the wire.
    pub const LEN: usize = 18;

    /// Decodes a greeting from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::LEN)?;
        check_magic(buf)?;
        match NetworkEndian::read_u64(&buf[field::STYLE]) {
            OPTS_MAGIC => {}
            found => {
                return Err(Error::BadMagic {
                    what: "IHAVEOPT",
                    found,
                })
            }
        }
        Ok(Self {
            flags: HandshakeFlags::from_bits(NetworkEndian::read_u16(&buf[field::HANDSHAKE_FLAGS])),
        })
    }

    /// Length of the encoding (18).
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[field::MAGIC], NBD_MAGIC);
        NetworkEndian::write_u64(&mut buf[field::STYLE], OPTS_MAGIC);
        NetworkEndian::write_u16(&mut buf[field::HANDSHAKE_FLAGS], self.flags.bits());
        Ok(Self::LEN)
    }
}

/// The oldstyle hello (152 bytes): everything a client gets before transmission starts.
///
/// The 32-bit flags field holds the handshake flags in its upper half (always zero in
/// oldstyle; kept here so that a non-zero value can be seen and reported) and the
/// transmission flags in its lower half. The 124 reserved bytes are ignored on input and
/// written as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldstyleHello {
    /// Export size in bytes.
    pub size: u64,
    /// Upper 16 bits of the flags field; the spec requires 0.
    pub handshake_flags: HandshakeFlags,
    /// Transmission flags of the (only) export.
    pub transmission_flags: TransmissionFlags,
}

impl OldstyleHello {
    /// Length on the wire.
    pub const LEN: usize = 152;

    /// Decodes an oldstyle hello from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::LEN)?;
        check_magic(buf)?;
        match NetworkEndian::read_u64(&buf[field::STYLE]) {
            OLDSTYLE_MAGIC => {}
            found => {
                return Err(Error::BadMagic {
                    what: "cliserv_magic",
                    found,
                })
            }
        }
        Ok(Self {
            size: NetworkEndian::read_u64(&buf[field::SIZE]),
            handshake_flags: HandshakeFlags::from_bits(NetworkEndian::read_u16(
                &buf[field::OLD_HANDSHAKE_FLAGS],
            )),
            transmission_flags: TransmissionFlags::from_bits(NetworkEndian::read_u16(
                &buf[field::OLD_TRANSMISSION_FLAGS],
            )),
        })
    }

    /// Length of the encoding (152).
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[field::MAGIC], NBD_MAGIC);
        NetworkEndian::write_u64(&mut buf[field::STYLE], OLDSTYLE_MAGIC);
        NetworkEndian::write_u64(&mut buf[field::SIZE], self.size);
        NetworkEndian::write_u16(
            &mut buf[field::OLD_HANDSHAKE_FLAGS],
            self.handshake_flags.bits(),
        );
        NetworkEndian::write_u16(
            &mut buf[field::OLD_TRANSMISSION_FLAGS],
            self.transmission_flags.bits(),
        );
        buf[field::OLD_ZEROES].fill(0);
        debug_assert_eq!(field::OLD_ZEROES.len(), ZERO_PAD_LEN);
        Ok(Self::LEN)
    }
}

impl ClientFlags {
    /// Length on the wire.
    pub const LEN: usize = 4;

    /// Decodes the client's 4-byte flags.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::LEN)?;
        Ok(Self::from_bits(NetworkEndian::read_u32(&buf[..Self::LEN])))
    }

    /// Length of the encoding (4).
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Encodes into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u32(&mut buf[..Self::LEN], self.bits());
        Ok(Self::LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use proptest::prelude::*;

    // spec-digest 7: newstyle greeting, FIXED_NEWSTYLE | NO_ZEROES.
    static GREETING: [u8; 18] = [
        0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50,
        0x54, 0x00, 0x03,
    ];

    fn oldstyle_bytes() -> [u8; 152] {
        // spec-digest 7: size 1 MiB, flags HAS_FLAGS | SEND_FLUSH.
        let mut b = [0u8; 152];
        b[..28].copy_from_slice(&[
            0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, 0x00, 0x00, 0x42, 0x02, 0x81, 0x86,
            0x12, 0x53, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05,
        ]);
        b
    }

    #[test]
    fn greeting_parse_emit() {
        let g = Greeting::parse(&GREETING).unwrap();
        assert_eq!(
            g.flags,
            HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES
        );
        assert_eq!(Hello::parse(&GREETING), Ok(Hello::Newstyle(g)));
        let mut out = [0xa5; 18];
        assert_eq!(g.emit(&mut out), Ok(18));
        assert_eq!(out, GREETING);
        assert_eq!(
            g.emit(&mut out[..17]),
            Err(Error::BufferTooSmall { required: 18 })
        );
    }

    #[test]
    fn oldstyle_parse_emit() {
        let bytes = oldstyle_bytes();
        let h = OldstyleHello::parse(&bytes).unwrap();
        assert_eq!(h.size, 1 << 20);
        assert!(h.handshake_flags.is_empty());
        assert_eq!(
            h.transmission_flags,
            TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH
        );
        assert_eq!(Hello::parse(&bytes), Ok(Hello::Oldstyle(h)));
        let mut out = [0xa5; 152];
        assert_eq!(Hello::Oldstyle(h).emit(&mut out), Ok(152));
        assert_eq!(out, bytes);
    }

    #[test]
    fn oldstyle_reserved_bytes_are_ignored() {
        let mut bytes = oldstyle_bytes();
        bytes[151] = 0xff;
        assert_eq!(OldstyleHello::parse(&bytes).unwrap().size, 1 << 20);
    }

    #[test]
    fn client_flags_vector() {
        let f = ClientFlags::parse(&[0, 0, 0, 3]).unwrap();
        assert_eq!(f, ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES);
        let mut out = [0xa5; 4];
        assert_eq!(f.emit(&mut out), Ok(4));
        assert_eq!(out, [0, 0, 0, 3]);
        for k in 0..4 {
            assert_eq!(
                ClientFlags::parse(&out[..k]),
                Err(Error::Truncated { needed: 4 - k })
            );
        }
    }

    #[test]
    fn truncated_prefixes() {
        for k in 0..18 {
            assert_eq!(
                Greeting::parse(&GREETING[..k]),
                Err(Error::Truncated { needed: 18 - k })
            );
            let want = if k < 16 { 16 - k } else { 18 - k };
            assert_eq!(
                Hello::parse(&GREETING[..k]),
                Err(Error::Truncated { needed: want }),
                "{k}"
            );
        }
        let old = oldstyle_bytes();
        for k in 0..152 {
            let want = if k < 16 { 16 - k } else { 152 - k };
            assert_eq!(
                Hello::parse(&old[..k]),
                Err(Error::Truncated { needed: want })
            );
            assert_eq!(
                OldstyleHello::parse(&old[..k]),
                Err(Error::Truncated { needed: 152 - k })
            );
        }
    }

    #[test]
    fn bad_magics() {
        let mut b = GREETING;
        b[0] = b'X';
        assert!(matches!(
            Hello::parse(&b),
            Err(Error::BadMagic {
                what: "NBDMAGIC",
                ..
            })
        ));
        let mut b = GREETING;
        b[15] = b'X';
        assert!(matches!(
            Hello::parse(&b),
            Err(Error::BadMagic {
                what: "IHAVEOPT or cliserv_magic",
                ..
            })
        ));
        let mut padded = [0u8; 152];
        padded[..18].copy_from_slice(&GREETING);
        assert!(matches!(
            OldstyleHello::parse(&padded),
            Err(Error::BadMagic { .. })
        ));
        assert!(matches!(
            Greeting::parse(&oldstyle_bytes()),
            Err(Error::BadMagic { .. })
        ));
    }

    proptest! {
        #[test]
        fn hello_roundtrip(h in hello()) {
            let mut buf = [0u8; 152];
            let n = h.emit(&mut buf).unwrap();
            prop_assert_eq!(n, h.buffer_len());
            prop_assert_eq!(Hello::parse(&buf[..n]), Ok(h));
        }

        #[test]
        fn hello_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = Hello::parse(&bytes) {
                let mut out = [0u8; 152];
                let n = h.emit(&mut out).unwrap();
                // Oldstyle padding is reserved: compare with it zeroed.
                let mut expect = bytes[..n].to_vec();
                if n == OldstyleHello::LEN { expect[28..].fill(0); }
                prop_assert_eq!(&out[..n], &expect[..]);
            }
        }

        #[test]
        fn client_flags_roundtrip(bits in any::<u32>()) {
            let f = ClientFlags::from_bits(bits);
            let mut out = [0u8; 4];
            f.emit(&mut out).unwrap();
            prop_assert_eq!(ClientFlags::parse(&out), Ok(f));
        }
    }
}
