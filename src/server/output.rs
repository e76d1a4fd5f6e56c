//! The server's bounded output queue: encoded headers and small messages in one linear
//! byte buffer, interleaved with payload markers that tell the caller to send its own
//! bytes. Nothing here ever holds payload data.

use arrayvec::ArrayVec;

use crate::common::Transmit;
use crate::wire::{self, Cookie};
use crate::{Error, Misuse};

/// Maximum number of queued segments.
pub(crate) const MAX_SEGMENTS: usize = 64;

#[derive(Debug, Clone, Copy)]
enum Segment {
    /// `len` encoded bytes at the front of the byte buffer.
    Bytes(usize),
    /// The caller's payload.
    Payload {
        cookie: Cookie,
        offset: u64,
        len: usize,
    },
    /// `len` zero bytes the caller sends (holes of a simple read reply).
    Zeroes {
        cookie: Cookie,
        offset: u64,
        len: usize,
    },
}

/// Queue of output segments over a `B`-byte buffer.
#[derive(Debug, Clone)]
pub(crate) struct Output<const B: usize> {
    buf: [u8; B],
    head: usize,
    tail: usize,
    segments: ArrayVec<Segment, MAX_SEGMENTS>,
    /// First segment index not yet handed out (segments before it are gone).
    front: usize,
}

impl<const B: usize> Output<B> {
    pub(crate) fn new() -> Self {
        Self {
            buf: [0; B],
            head: 0,
            tail: 0,
            segments: ArrayVec::new(),
            front: 0,
        }
    }

    /// True when nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.front == self.segments.len()
    }

    /// Drops everything queued (used when a hard disconnect must send nothing more).
    pub(crate) fn clear(&mut self) {
        self.segments.clear();
        self.front = 0;
        self.head = 0;
        self.tail = 0;
    }

    /// Bytes free for one more message, after compaction.
    pub(crate) fn free(&self) -> usize {
        B - (self.tail - self.head)
    }

    /// Number of segments that can still be queued.
    pub(crate) fn free_segments(&self) -> usize {
        MAX_SEGMENTS - (self.segments.len() - self.front)
    }

    fn compact(&mut self) {
        if self.front > 0 {
            self.segments.drain(..self.front);
            self.front = 0;
        }
        if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
    }

    /// Encodes one message of at most `max` bytes with `f`, which returns the length it
    /// wrote. Nothing is queued if `f` fails or the queue is full.
    pub(crate) fn push_with(
        &mut self,
        max: usize,
        f: impl FnOnce(&mut [u8]) -> wire::Result<usize>,
    ) -> Result<(), Error> {
        if self.free_segments() == 0 {
            return Err(Misuse::TransmitPending.into());
        }
        if B - self.tail < max {
            self.compact();
        }
        let end = self.tail + max.min(B - self.tail);
        let room = &mut self.buf[self.tail..end];
        let n = match f(room) {
            Ok(n) => n,
            Err(wire::Error::BufferTooSmall { .. }) => return Err(Misuse::TransmitPending.into()),
            Err(e) => return Err(Misuse::Encode(e).into()),
        };
        self.tail += n;
        self.push_segment(Segment::Bytes(n));
        Ok(())
    }

    fn push_segment(&mut self, seg: Segment) {
        if self.segments.is_full() {
            self.compact();
        }
        // Coalesce adjacent byte runs so one transmit carries many small headers.
        let queued = self.segments.len() > self.front;
        if let (true, Segment::Bytes(n), Some(Segment::Bytes(last))) =
            (queued, seg, self.segments.last_mut())
        {
            *last += n;
            return;
        }
        // invariant: callers checked free_segments() > 0, and compaction above freed the
        // slots of segments already handed out.
        let _ = self.segments.try_push(seg);
    }

    /// Queues a payload marker.
    pub(crate) fn push_payload(
        &mut self,
        cookie: Cookie,
        offset: u64,
        len: usize,
        zeroes: bool,
    ) -> Result<(), Error> {
        if self.free_segments() == 0 {
            return Err(Misuse::TransmitPending.into());
        }
        self.push_segment(if zeroes {
            Segment::Zeroes {
                cookie,
                offset,
                len,
            }
        } else {
            Segment::Payload {
                cookie,
                offset,
                len,
            }
        });
        Ok(())
    }

    /// Hands out the next segment: bytes are copied into `out` (as many whole byte runs as
    /// the coalesced segment holds; a run larger than `out` is split), payloads become
    /// markers.
    pub(crate) fn poll(&mut self, out: &mut [u8]) -> Result<Option<Transmit>, Error> {
        let Some(seg) = self.segments.get_mut(self.front) else {
            self.clear();
            return Ok(None);
        };
        let t = match seg {
            Segment::Bytes(len) => {
                if out.is_empty() {
                    return Err(Error::BufferTooSmall {
                        required: (*len).min(B),
                    });
                }
                let n = (*len).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.head..self.head + n]);
                self.head += n;
                *len -= n;
                if *len > 0 {
                    return Ok(Some(Transmit::Bytes(n)));
                }
                Transmit::Bytes(n)
            }
            Segment::Payload {
                cookie,
                offset,
                len,
            } => Transmit::Payload {
                cookie: *cookie,
                offset: *offset,
                len: *len,
            },
            Segment::Zeroes {
                cookie,
                offset,
                len,
            } => Transmit::Zeroes {
                cookie: *cookie,
                offset: *offset,
                len: *len,
            },
        };
        self.front += 1;
        if self.is_empty() {
            self.clear();
        }
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_and_splits() {
        let mut o = Output::<64>::new();
        o.push_with(8, |b| {
            b[..3].copy_from_slice(b"abc");
            Ok(3)
        })
        .unwrap();
        o.push_with(8, |b| {
            b[..2].copy_from_slice(b"de");
            Ok(2)
        })
        .unwrap();
        o.push_payload(Cookie(1), 0, 100, false).unwrap();
        o.push_with(8, |b| {
            b[..1].copy_from_slice(b"f");
            Ok(1)
        })
        .unwrap();
        let mut out = [0u8; 4];
        assert_eq!(o.poll(&mut out).unwrap(), Some(Transmit::Bytes(4)));
        assert_eq!(&out, b"abcd");
        assert_eq!(o.poll(&mut out).unwrap(), Some(Transmit::Bytes(1)));
        assert_eq!(out[0], b'e');
        assert_eq!(
            o.poll(&mut out).unwrap(),
            Some(Transmit::Payload {
                cookie: Cookie(1),
                offset: 0,
                len: 100
            })
        );
        assert_eq!(o.poll(&mut out).unwrap(), Some(Transmit::Bytes(1)));
        assert_eq!(o.poll(&mut out).unwrap(), None);
        assert!(o.is_empty());
        assert_eq!(o.free(), 64);
    }

    #[test]
    fn full_buffer_is_misuse_not_corruption() {
        let mut o = Output::<8>::new();
        o.push_with(8, |b| Ok(b.len())).unwrap();
        let err = o.push_with(4, |b| wire::room(b, 4).map(|_| 4)).unwrap_err();
        assert_eq!(err, Error::Misuse(Misuse::TransmitPending));
        let mut out = [0u8; 8];
        assert_eq!(o.poll(&mut out).unwrap(), Some(Transmit::Bytes(8)));
        assert_eq!(o.poll(&mut out).unwrap(), None);
        o.push_with(4, |b| wire::room(b, 4).map(|_| 4)).unwrap();
    }
}
