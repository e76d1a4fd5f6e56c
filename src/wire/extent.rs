//! Block-status extents (proto.md "Block status metadata", `NBD_REPLY_TYPE_BLOCK_STATUS`
//! and `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
//!
//! ```text
//! 32-bit descriptor (8 bytes):        64-bit descriptor (16 bytes):
//!    32 bits length (non-zero)           64 bits length (non-zero)
//!    32 bits status flags                64 bits status flags
//! ```
//!
//! [`Extents`] iterates over descriptors in place, without allocating; [`emit_extents`]
//! encodes a slice of [`Extent`]s. Rules about the values (non-zero lengths, coverage of
//! the request) belong to the state machines, which report which rule was broken.

use byteorder::{ByteOrder, NetworkEndian};

use super::{room, Error, Result};

/// `NBD_STATE_HOLE` (bit 0 of `base:allocation`): the extent is not allocated.
pub const STATE_HOLE: u64 = 1 << 0;
/// `NBD_STATE_ZERO` (bit 1 of `base:allocation`): the extent reads as zeroes.
pub const STATE_ZERO: u64 = 1 << 1;
/// `NBD_STATE_DIRTY` (bit 0 of `qemu:dirty-bitmap:*`): the extent is dirty.
pub const STATE_DIRTY: u64 = 1 << 0;

/// One block-status descriptor: a length and its status for one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Status: flags for `base:allocation` and `qemu:dirty-bitmap:*`, a number for
    /// `qemu:allocation-depth`.
    pub status: u64,
}

impl Extent {
    /// Size of a 32-bit descriptor.
    pub const NARROW_LEN: usize = 8;
    /// Size of a 64-bit descriptor.
    pub const WIDE_LEN: usize = 16;

    /// Size of a descriptor of the given width.
    #[inline]
    pub const fn width(wide: bool) -> usize {
        if wide {
            Self::WIDE_LEN
        } else {
            Self::NARROW_LEN
        }
    }

    /// Decodes one descriptor from the start of `buf` (8 or 16 bytes).
    #[inline]
    pub fn parse(buf: &[u8], wide: bool) -> Result<Self> {
        super::need(buf, Self::width(wide))?;
        Ok(if wide {
            Self {
                len: NetworkEndian::read_u64(&buf[..8]),
                status: NetworkEndian::read_u64(&buf[8..16]),
            }
        } else {
            Self {
                len: NetworkEndian::read_u32(&buf[..4]).into(),
                status: NetworkEndian::read_u32(&buf[4..8]).into(),
            }
        })
    }

    /// Encodes one descriptor into `buf`, returning the bytes written. A 32-bit
    /// descriptor cannot hold a length or status over 32 bits.
    #[inline]
    pub fn emit(&self, buf: &mut [u8], wide: bool) -> Result<usize> {
        let width = Self::width(wide);
        room(buf, width)?;
        if wide {
            NetworkEndian::write_u64(&mut buf[..8], self.len);
            NetworkEndian::write_u64(&mut buf[8..16], self.status);
        } else {
            let len = u32::try_from(self.len).map_err(|_| Error::BadLength {
                what: "32-bit extent length over 32 bits",
                len: self.len,
            })?;
            let status = u32::try_from(self.status).map_err(|_| Error::BadValue {
                what: "32-bit extent status over 32 bits",
                value: self.status,
            })?;
            NetworkEndian::write_u32(&mut buf[..4], len);
            NetworkEndian::write_u32(&mut buf[4..8], status);
        }
        Ok(width)
    }
}

/// An allocation-free view of consecutive descriptors, 32- or 64-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extents<'a> {
    bytes: &'a [u8],
    wide: bool,
}

impl<'a> Extents<'a> {
    /// Wraps descriptor bytes; their length must be a multiple of the descriptor size.
    pub fn new(bytes: &'a [u8], wide: bool) -> Result<Self> {
        if !bytes.len().is_multiple_of(Extent::width(wide)) {
            return Err(Error::BadLength {
                what: "extent bytes are not a whole number of descriptors",
                len: bytes.len() as u64,
            });
        }
        Ok(Self { bytes, wide })
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.bytes.len() / Extent::width(self.wide)
    }

    /// True if there is no descriptor.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// True for 64-bit descriptors.
    pub fn is_wide(&self) -> bool {
        self.wide
    }

    /// The raw descriptor bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Descriptor `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<Extent> {
        let w = Extent::width(self.wide);
        let at = i.checked_mul(w)?;
        Extent::parse(self.bytes.get(at..at.checked_add(w)?)?, self.wide).ok()
    }

    /// The descriptors, in order.
    pub fn iter(&self) -> ExtentIter<'a> {
        ExtentIter { rest: *self }
    }
}

impl<'a> IntoIterator for Extents<'a> {
    type Item = Extent;
    type IntoIter = ExtentIter<'a>;
    fn into_iter(self) -> ExtentIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Extents`].
#[derive(Debug, Clone)]
pub struct ExtentIter<'a> {
    rest: Extents<'a>,
}

impl Iterator for ExtentIter<'_> {
    type Item = Extent;

    #[inline]
    fn next(&mut self) -> Option<Extent> {
        let w = Extent::width(self.rest.wide);
        let (head, tail) = self.rest.bytes.split_at_checked(w)?;
        self.rest.bytes = tail;
        Extent::parse(head, self.rest.wide).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rest.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for ExtentIter<'_> {}

/// Encoded length of `count` descriptors.
pub fn extents_len(count: usize, wide: bool) -> Option<usize> {
    count.checked_mul(Extent::width(wide))
}

/// Encodes `extents` back to back into `buf`, returning the bytes written. Nothing is
/// written if the buffer is too small or an extent does not fit a 32-bit descriptor.
pub fn emit_extents(extents: &[Extent], wide: bool, buf: &mut [u8]) -> Result<usize> {
    let len = extents_len(extents.len(), wide).ok_or(Error::BadLength {
        what: "too many extents",
        len: extents.len() as u64,
    })?;
    room(buf, len)?;
    if !wide {
        for e in extents {
            if e.len > u64::from(u32::MAX) {
                return Err(Error::BadLength {
                    what: "32-bit extent length over 32 bits",
                    len: e.len,
                });
            }
            if e.status > u64::from(u32::MAX) {
                return Err(Error::BadValue {
                    what: "32-bit extent status over 32 bits",
                    value: e.status,
                });
            }
        }
    }
    for (e, out) in extents
        .iter()
        .zip(buf.chunks_exact_mut(Extent::width(wide)))
    {
        e.emit(out, wide)?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn narrow_and_wide() {
        let narrow = [0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 0];
        let ex = Extents::new(&narrow, false).unwrap();
        assert_eq!(ex.len(), 2);
        let v: Vec<_> = ex.iter().collect();
        assert_eq!(
            v,
            [
                Extent {
                    len: 4096,
                    status: 3
                },
                Extent {
                    len: 8192,
                    status: 0
                }
            ]
        );
        assert_eq!(
            ex.get(1),
            Some(Extent {
                len: 8192,
                status: 0
            })
        );
        assert_eq!(ex.get(2), None);
        assert_eq!(ex.get(usize::MAX), None);
        let mut out = [0xa5; 16];
        assert_eq!(emit_extents(&v, false, &mut out), Ok(16));
        assert_eq!(out, narrow);

        let wide = [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let ex = Extents::new(&wide, true).unwrap();
        assert_eq!(
            ex.iter().collect::<Vec<_>>(),
            [Extent {
                len: 1 << 33,
                status: 3
            }]
        );
        // A payload cut inside a descriptor is malformed; a lone descriptor cut short says
        // how many bytes it still needs.
        assert!(matches!(
            Extents::new(&wide[..15], true),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            Extents::new(&narrow[..7], false),
            Err(Error::BadLength { .. })
        ));
        for k in 0..16 {
            assert_eq!(
                Extent::parse(&wide[..k], true),
                Err(Error::Truncated { needed: 16 - k })
            );
        }
        for k in 0..8 {
            assert_eq!(
                Extent::parse(&narrow[..k], false),
                Err(Error::Truncated { needed: 8 - k })
            );
        }
    }

    #[test]
    fn narrow_limits() {
        let mut out = [0u8; 8];
        let big = [Extent {
            len: 1 << 32,
            status: 0,
        }];
        assert!(matches!(
            emit_extents(&big, false, &mut out),
            Err(Error::BadLength { .. })
        ));
        let big = [Extent {
            len: 1,
            status: 1 << 32,
        }];
        assert!(matches!(
            emit_extents(&big, false, &mut out),
            Err(Error::BadValue { .. })
        ));
        assert_eq!(
            emit_extents(&big, false, &mut out[..7]),
            Err(Error::BufferTooSmall { required: 8 })
        );
    }

    proptest! {
        #[test]
        fn roundtrip(v in prop::collection::vec((any::<u64>(), any::<u64>()), 0..64), wide in any::<bool>()) {
            let v: Vec<Extent> = v.into_iter().map(|(len, status)| if wide {
                Extent { len, status }
            } else {
                Extent { len: len & 0xffff_ffff, status: status & 0xffff_ffff }
            }).collect();
            let mut buf = vec![0; v.len() * Extent::width(wide)];
            prop_assert_eq!(emit_extents(&v, wide, &mut buf), Ok(buf.len()));
            let back: Vec<_> = Extents::new(&buf, wide).unwrap().iter().collect();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..100), wide in any::<bool>()) {
            if let Ok(ex) = Extents::new(&bytes, wide) {
                let v: Vec<_> = ex.iter().collect();
                prop_assert_eq!(v.len(), ex.len());
                let mut out = vec![0; bytes.len()];
                emit_extents(&v, wide, &mut out).unwrap();
                prop_assert_eq!(out, bytes);
            }
        }
    }
}
