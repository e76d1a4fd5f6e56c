//! The client's table of commands in flight: a fixed-size `ArrayVec`, one entry per cookie,
//! in submission order (which is also the order their headers go out).
//!
//! Each entry remembers what the reply must be checked against: the command, its flags,
//! its range, the first error seen, and per-command progress (which bytes of a read are
//! covered, which metadata contexts a block-status reply has answered).

use arrayvec::ArrayVec;

use crate::wire::{CmdFlags, Command, Cookie, Errno};

/// How many disjoint fragments of one read are tracked exactly (see [`ReadTrack`]).
pub(crate) const READ_FRAGMENTS: usize = 4;

/// Where a command's request stands on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Send {
    /// The header has not been written by `poll_transmit` yet.
    Queued,
    /// The header went out; the write payload is the next thing to send.
    PayloadDue,
    /// Everything went out; a reply is owed.
    Sent,
}

/// Per-command progress of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Track {
    /// `NBD_CMD_READ`: content coverage.
    Read(ReadTrack),
    /// `NBD_CMD_BLOCK_STATUS`: contexts expected and answered, as bit masks over the
    /// negotiated context list.
    BlockStatus {
        /// Contexts the reply must cover.
        expected: u16,
        /// Contexts a chunk arrived for.
        seen: u16,
    },
    /// Any other command: nothing to track but the error.
    Other,
}

/// One command in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub(crate) cookie: Cookie,
    pub(crate) command: Command,
    /// Flags as sent (including `PAYLOAD_LEN` where the machine added it).
    pub(crate) flags: CmdFlags,
    pub(crate) offset: u64,
    /// Effect length (the data length for reads and writes).
    pub(crate) len: u64,
    pub(crate) send: Send,
    /// First error reported for this command (proto.md: the reply failed if any error
    /// chunk came; the first one is what the caller gets).
    pub(crate) error: Option<Errno>,
    pub(crate) track: Track,
}

impl InFlight {
    /// One past the last byte of the request range.
    pub(crate) fn end(&self) -> u64 {
        // invariant: commands are checked against the export size (offset + len <= size)
        // before they are queued, so this cannot overflow; saturate all the same.
        self.offset.saturating_add(self.len)
    }

    /// True if `[offset, offset + len)` lies inside the request range.
    pub(crate) fn contains(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset && offset.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// Coverage of one read's range by content chunks.
///
/// Up to [`READ_FRAGMENTS`] disjoint fragments are kept (adjacent ones merge, so chunks that
/// arrive in order always stay one fragment): while they fit, overlap detection is exact.
/// When a reply scatters more fragments than that, the list stops growing and only the
/// byte count is checked from then on: a total above the request length is an overlap, and
/// success needs the total to equal it. An overlap exactly compensated by a gap can then
/// go unnoticed; no real server has been seen to fragment a read that much out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReadTrack {
    /// Disjoint covered ranges `[start, end)`, relative to the request offset; the first
    /// `nfrags` are in use.
    frags: [(u32, u32); READ_FRAGMENTS],
    nfrags: u8,
    /// The fragment list overflowed: only the byte count is reliable.
    overflowed: bool,
    /// Sum of all content chunk lengths.
    covered: u64,
    /// Number of content chunks (saturating), for `NBD_CMD_FLAG_DF`.
    pub(crate) chunks: u32,
    /// Offsets (relative to the request) of the first `nerrors` `ERROR_OFFSET` chunks:
    /// proto.md forbids a later content chunk to cover them. Further ones are not kept.
    errors: [u32; READ_FRAGMENTS],
    nerrors: u8,
}

impl ReadTrack {
    /// Records content `[start, start + len)` (relative to the request offset, already
    /// checked to lie inside a request of `req_len` bytes). `Err` on overlap.
    pub(crate) fn add(&mut self, start: u32, len: u32, req_len: u64) -> Result<(), ()> {
        let end = start.checked_add(len).ok_or(())?;
        if !self.overflowed && self.used().iter().any(|&(s, e)| start < e && s < end) {
            return Err(());
        }
        // proto.md: content must not overlap an earlier error chunk either (a content
        // chunk and an error chunk at the same offset come content first).
        let errors = self.errors.get(..usize::from(self.nerrors)).unwrap_or(&[]);
        if errors.iter().any(|&o| start <= o && o < end) {
            return Err(());
        }
        self.covered = self.covered.saturating_add(len.into());
        if self.covered > req_len {
            return Err(());
        }
        self.chunks = self.chunks.saturating_add(1);
        if self.overflowed {
            return Ok(());
        }
        // Merge with every adjacent fragment, then insert.
        let (mut s, mut e) = (start, end);
        while let Some(i) = self.used().iter().position(|&(fs, fe)| fe == s || fs == e) {
            let (fs, fe) = self.frags[i];
            s = s.min(fs);
            e = e.max(fe);
            // Swap-remove fragment i.
            self.nfrags -= 1;
            self.frags[i] = self.frags[usize::from(self.nfrags)];
        }
        match self.frags.get_mut(usize::from(self.nfrags)) {
            Some(slot) => {
                *slot = (s, e);
                self.nfrags += 1;
            }
            None => self.overflowed = true,
        }
        Ok(())
    }

    /// Records an `NBD_REPLY_TYPE_ERROR_OFFSET` at `at` (relative to the request offset).
    pub(crate) fn add_error(&mut self, at: u32) {
        if let Some(slot) = self.errors.get_mut(usize::from(self.nerrors)) {
            *slot = at;
            self.nerrors += 1;
        }
    }

    fn used(&self) -> &[(u32, u32)] {
        // invariant: nfrags <= READ_FRAGMENTS; `get` keeps this panic-free regardless.
        self.frags.get(..usize::from(self.nfrags)).unwrap_or(&[])
    }

    /// True if the content chunks cover the whole request of `req_len` bytes.
    pub(crate) fn complete(&self, req_len: u64) -> bool {
        self.covered == req_len
    }
}

/// The table itself.
#[derive(Debug, Clone)]
pub(crate) struct Table<const N: usize> {
    entries: ArrayVec<InFlight, N>,
    next_cookie: u64,
}

impl<const N: usize> Table<N> {
    pub(crate) fn new() -> Self {
        Self {
            entries: ArrayVec::new(),
            next_cookie: 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.entries.is_full()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &InFlight> + '_ {
        self.entries.iter()
    }

    /// The next free cookie: a counter, skipping values still in use (deterministic, so
    /// sessions replay byte for byte).
    pub(crate) fn allocate_cookie(&mut self) -> Cookie {
        loop {
            let c = Cookie(self.next_cookie);
            self.next_cookie = self.next_cookie.wrapping_add(1);
            // Terminates: at most N cookies are in use.
            if !self.entries.iter().any(|e| e.cookie == c) {
                return c;
            }
        }
    }

    /// Adds an entry; the caller checked `is_full()` first.
    pub(crate) fn push(&mut self, entry: InFlight) -> Result<(), ()> {
        self.entries.try_push(entry).map_err(|_| ())
    }

    /// The entry of a command whose request went out, for a reply.
    pub(crate) fn sent_mut(&mut self, cookie: Cookie) -> Option<&mut InFlight> {
        self.entries
            .iter_mut()
            .find(|e| e.cookie == cookie && e.send == Send::Sent)
    }

    /// Removes a command (its reply is complete).
    pub(crate) fn remove(&mut self, cookie: Cookie) -> Option<InFlight> {
        let i = self.entries.iter().position(|e| e.cookie == cookie)?;
        Some(self.entries.remove(i))
    }

    /// Removes the oldest command, for abandonment.
    pub(crate) fn pop_front(&mut self) -> Option<InFlight> {
        if self.entries.is_empty() {
            None
        } else {
            Some(self.entries.remove(0))
        }
    }

    /// The first command whose request has not fully gone out.
    pub(crate) fn first_unsent_mut(&mut self) -> Option<&mut InFlight> {
        self.entries.iter_mut().find(|e| e.send != Send::Sent)
    }

    /// True if some reply is owed.
    pub(crate) fn has_sent(&self) -> bool {
        self.entries.iter().any(|e| e.send == Send::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_chunks_stay_one_fragment() {
        let mut t = ReadTrack::default();
        for i in 0..100 {
            t.add(i * 10, 10, 1000).unwrap();
        }
        assert_eq!(t.used().len(), 1);
        assert!(!t.overflowed);
        assert!(t.complete(1000));
    }

    #[test]
    fn overlap_is_exact_while_fragments_fit() {
        let mut t = ReadTrack::default();
        t.add(0, 10, 100).unwrap();
        t.add(50, 10, 100).unwrap();
        t.add(30, 10, 100).unwrap();
        assert_eq!(t.add(55, 1, 100), Err(()));
        assert_eq!(t.add(9, 2, 100), Err(()));
        // Filling the gaps merges everything back into one fragment.
        t.add(10, 20, 100).unwrap();
        t.add(40, 10, 100).unwrap();
        t.add(60, 40, 100).unwrap();
        assert_eq!(t.used(), &[(0, 100)]);
        assert!(t.complete(100));
    }

    #[test]
    fn content_after_an_error_at_its_offset_overlaps() {
        let mut t = ReadTrack::default();
        // Content first, then an error inside it: allowed.
        t.add(0, 10, 100).unwrap();
        t.add_error(5);
        // An error, then content covering it: not allowed.
        t.add_error(50);
        assert_eq!(t.add(40, 20, 100), Err(()));
        assert_eq!(t.add(50, 1, 100), Err(()));
        t.add(40, 10, 100).unwrap();
        t.add(51, 49, 100).unwrap();
    }

    #[test]
    fn overflow_falls_back_to_the_byte_count() {
        let mut t = ReadTrack::default();
        for i in 0..6 {
            t.add(i * 20, 10, 120).unwrap();
        }
        assert!(t.overflowed);
        assert!(!t.complete(120));
        // Too many bytes is still an overlap.
        for i in 0..6 {
            t.add(i * 20 + 10, 10, 120).unwrap();
        }
        assert!(t.complete(120));
        assert_eq!(t.add(0, 1, 120), Err(()));
    }

    #[test]
    fn cookies_skip_values_in_use() {
        let mut t: Table<4> = Table::new();
        let c1 = t.allocate_cookie();
        assert_eq!(c1, Cookie(1));
        t.push(InFlight {
            cookie: Cookie(2),
            command: Command::Flush,
            flags: CmdFlags::empty(),
            offset: 0,
            len: 0,
            send: Send::Sent,
            error: None,
            track: Track::Other,
        })
        .unwrap();
        assert_eq!(t.allocate_cookie(), Cookie(3));
    }
}
