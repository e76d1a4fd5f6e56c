//! Flag fields: handshake, client, transmission, command and reply flags.
//!
//! Each is a newtype over the wire integer that keeps every bit, known or not: peers must
//! ignore unknown bits (proto.md), and a proxy or a fuzzer must be able to send them back
//! unchanged. Bit numbers follow the spec, not old headers: bit 8 of the transmission
//! flags is `NBD_FLAG_CAN_MULTI_CONN` and bit 10 is `NBD_FLAG_SEND_CACHE`.

macro_rules! flags {
    (
        $(#[$attr:meta])*
        pub struct $name:ident($ty:ty) {
            $(
                $(#[$flag_attr:meta])*
                const $flag:ident = $value:expr;
            )+
        }
    ) => {
        $(#[$attr])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name($ty);

        impl $name {
            $(
                $(#[$flag_attr])*
                pub const $flag: Self = Self($value);
            )+

            /// Every bit this crate gives a name to.
            pub const KNOWN: Self = Self(0 $( | $value )+);

            /// Named flags with their spec names, in bit order.
            pub const NAMES: &'static [(&'static str, Self)] = &[ $( (stringify!($flag), Self::$flag) ),+ ];

            /// No bits set.
            #[inline]
            pub const fn empty() -> Self {
                Self(0)
            }

            /// Wraps raw wire bits, keeping unknown ones.
            #[inline]
            pub const fn from_bits(bits: $ty) -> Self {
                Self(bits)
            }

            /// The raw wire bits.
            #[inline]
            pub const fn bits(self) -> $ty {
                self.0
            }

            /// True if every bit of `other` is set in `self`.
            #[inline]
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// True if any bit of `other` is set in `self`.
            #[inline]
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            /// True if no bit is set.
            #[inline]
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// The bits this crate has no name for.
            #[inline]
            pub const fn unknown(self) -> Self {
                Self(self.0 & !Self::KNOWN.0)
            }

            /// `self` with the bits of `other` added.
            #[inline]
            #[must_use]
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// `self` restricted to the bits of `other`.
            #[inline]
            #[must_use]
            pub const fn intersection(self, other: Self) -> Self {
                Self(self.0 & other.0)
            }

            /// `self` without the bits of `other`.
            #[inline]
            #[must_use]
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }

            /// Sets the bits of `other`.
            #[inline]
            pub fn insert(&mut self, other: Self) {
                self.0 |= other.0;
            }

            /// Clears the bits of `other`.
            #[inline]
            pub fn remove(&mut self, other: Self) {
                self.0 &= !other.0;
            }

            /// Sets or clears the bits of `other`.
            #[inline]
            pub fn set(&mut self, other: Self, value: bool) {
                if value { self.insert(other) } else { self.remove(other) }
            }
        }

        impl ::core::ops::BitOr for $name {
            type Output = Self;
            #[inline]
            fn bitor(self, rhs: Self) -> Self { self.union(rhs) }
        }
        impl ::core::ops::BitOrAssign for $name {
            #[inline]
            fn bitor_assign(&mut self, rhs: Self) { self.insert(rhs) }
        }
        impl ::core::ops::BitAnd for $name {
            type Output = Self;
            #[inline]
            fn bitand(self, rhs: Self) -> Self { self.intersection(rhs) }
        }
        impl ::core::ops::BitAndAssign for $name {
            #[inline]
            fn bitand_assign(&mut self, rhs: Self) { self.0 &= rhs.0 }
        }
        impl ::core::ops::Not for $name {
            type Output = Self;
            #[inline]
            fn not(self) -> Self { Self(!self.0) }
        }

        impl From<$ty> for $name {
            #[inline]
            fn from(bits: $ty) -> Self { Self(bits) }
        }
        impl From<$name> for $ty {
            #[inline]
            fn from(flags: $name) -> Self { flags.0 }
        }

        /// Formats as `NAME | NAME | 0x...` (unknown bits in hex), or `0` when empty.
        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                if self.0 == 0 {
                    return f.write_str("0");
                }
                let mut first = true;
                for (name, flag) in Self::NAMES {
                    if self.contains(*flag) {
                        if !first { f.write_str(" | ")?; }
                        f.write_str(name)?;
                        first = false;
                    }
                }
                let unknown = self.unknown().0;
                if unknown != 0 {
                    if !first { f.write_str(" | ")?; }
                    write!(f, "{unknown:#x}")?;
                }
                Ok(())
            }
        }

        impl ::core::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
    };
}

// Also used for the check sets of adversarial mode.
#[allow(unused_imports)]
pub(crate) use flags;

flags! {
    /// Handshake flags (16 bits), sent by a newstyle server in its greeting.
    pub struct HandshakeFlags(u16) {
        /// `NBD_FLAG_FIXED_NEWSTYLE` (bit 0): the server speaks fixed newstyle.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_NO_ZEROES` (bit 1): the server can omit the 124 zero bytes.
        const NO_ZEROES = 1 << 1;
    }
}

flags! {
    /// Client flags (32 bits), the client's answer to the greeting.
    pub struct ClientFlags(u32) {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE` (bit 0): the client speaks fixed newstyle.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_C_NO_ZEROES` (bit 1): the client does not want the 124 zero bytes.
        const NO_ZEROES = 1 << 1;
    }
}

flags! {
    /// Transmission flags (16 bits) of an export: what it supports.
    pub struct TransmissionFlags(u16) {
        /// `NBD_FLAG_HAS_FLAGS` (bit 0): always set.
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY` (bit 1): the export is read-only.
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH` (bit 2): `NBD_CMD_FLUSH` is supported.
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA` (bit 3): `NBD_CMD_FLAG_FUA` is supported.
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL` (bit 4): the medium is rotational (a hint).
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM` (bit 5): `NBD_CMD_TRIM` is supported.
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES` (bit 6): `NBD_CMD_WRITE_ZEROES` and
        /// `NBD_CMD_FLAG_NO_HOLE` are supported.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF` (bit 7): `NBD_CMD_FLAG_DF` is supported on reads.
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN` (bit 8): caches are coherent across connections.
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE` (bit 9): `NBD_CMD_RESIZE` (experimental extension).
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE` (bit 10): `NBD_CMD_CACHE` is understood.
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO` (bit 11): `NBD_CMD_FLAG_FAST_ZERO` is supported.
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (bit 12): the payload form of
        /// `NBD_CMD_BLOCK_STATUS` is supported (extended headers only).
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
    }
}

flags! {
    /// Command flags (16 bits) of a request.
    pub struct CmdFlags(u16) {
        /// `NBD_CMD_FLAG_FUA` (bit 0): force unit access (needs `SEND_FUA`).
        const FUA = 1 << 0;
        /// `NBD_CMD_FLAG_NO_HOLE` (bit 1): `WRITE_ZEROES` must allocate.
        const NO_HOLE = 1 << 1;
        /// `NBD_CMD_FLAG_DF` (bit 2): do not fragment a structured read (needs `SEND_DF`).
        const DF = 1 << 2;
        /// `NBD_CMD_FLAG_REQ_ONE` (bit 3): one extent per block-status chunk.
        const REQ_ONE = 1 << 3;
        /// `NBD_CMD_FLAG_FAST_ZERO` (bit 4): fail `WRITE_ZEROES` unless it is fast.
        const FAST_ZERO = 1 << 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN` (bit 5): with extended headers, the length field is a
        /// payload length.
        const PAYLOAD_LEN = 1 << 5;
    }
}

flags! {
    /// Reply flags (16 bits) of a structured or extended reply chunk.
    pub struct ReplyFlags(u16) {
        /// `NBD_REPLY_FLAG_DONE` (bit 0): this is the last chunk of the reply.
        const DONE = 1 << 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_bit_numbers() {
        // proto.md: bit 8 is CAN_MULTI_CONN, bit 10 is SEND_CACHE (QEMU 3.0 had bit 8).
        assert_eq!(TransmissionFlags::CAN_MULTI_CONN.bits(), 0x0100);
        assert_eq!(TransmissionFlags::SEND_CACHE.bits(), 0x0400);
        assert_eq!(TransmissionFlags::SEND_FAST_ZERO.bits(), 0x0800);
        assert_eq!(TransmissionFlags::BLOCK_STATUS_PAYLOAD.bits(), 0x1000);
        assert_eq!(CmdFlags::PAYLOAD_LEN.bits(), 0x20);
        assert_eq!(TransmissionFlags::KNOWN.bits(), 0x1fff);
    }

    #[test]
    fn unknown_bits_are_kept() {
        let f = TransmissionFlags::from_bits(0x8001);
        assert_eq!(f.bits(), 0x8001);
        assert_eq!(f.unknown().bits(), 0x8000);
        assert!(f.contains(TransmissionFlags::HAS_FLAGS));
        assert_eq!(f.to_string(), "HAS_FLAGS | 0x8000");
        assert_eq!(format!("{:?}", CmdFlags::empty()), "CmdFlags(0)");
    }

    #[test]
    fn set_operations() {
        let mut f = CmdFlags::FUA | CmdFlags::DF;
        assert!(f.contains(CmdFlags::FUA));
        assert!(!f.contains(CmdFlags::FUA | CmdFlags::REQ_ONE));
        assert!(f.intersects(CmdFlags::FUA | CmdFlags::REQ_ONE));
        f.remove(CmdFlags::FUA);
        assert_eq!(f, CmdFlags::DF);
        f.set(CmdFlags::REQ_ONE, true);
        assert_eq!(f.bits(), 0x0c);
        assert_eq!(f.difference(CmdFlags::DF), CmdFlags::REQ_ONE);
        assert_eq!((!CmdFlags::empty()).bits(), 0xffff);
    }
}
