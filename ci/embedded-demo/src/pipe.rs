//! A fixed-capacity byte pipe: the stand-in for a transport (a UART, a TCP socket of a
//! small IP stack) between the two machines.

/// Bytes written at the back and read from the front, in a `C`-byte array.
#[derive(Debug, Clone)]
pub struct Pipe<const C: usize> {
    buf: [u8; C],
    start: usize,
    end: usize,
    closed: bool,
}

impl<const C: usize> Default for Pipe<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const C: usize> Pipe<C> {
    /// An empty, open pipe.
    pub const fn new() -> Self {
        Self {
            buf: [0; C],
            start: 0,
            end: 0,
            closed: false,
        }
    }

    /// The bytes waiting to be read.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops `n` bytes from the front (at most what is there).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The free space at the back, after moving the waiting bytes to the front: encode
    /// into it, then [`commit`](Self::commit) what was written.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Adds `n` bytes written into [`space`](Self::space).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(C);
    }

    /// Copies as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let space = self.space();
        let n = bytes.len().min(space.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.commit(n);
        n
    }

    /// The writer is done: once the waiting bytes are read, the reader sees end of file.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// True once closed and drained: end of file for the reader.
    pub fn at_eof(&self) -> bool {
        self.closed && self.start == self.end
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
