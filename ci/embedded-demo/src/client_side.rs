//! The client role: a [`Client`] machine that opens the export, writes [`WRITE_DATA`] at
//! [`DATA_OFFSET`], reads it back into a fixed buffer, and disconnects.

use nbd_proto::client::{Client, ClientConfig, Event, State};
use nbd_proto::wire::{CmdFlags, Cookie};
use nbd_proto::{Error, Transmit, Want};

use crate::{DemoError, Pipe, DATA_LEN, DATA_OFFSET, EXPORT, IN_FLIGHT, WRITE_DATA};

/// What the client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Greeting and options, until `Event::Ready`.
    Handshake,
    /// The write is in flight.
    Writing,
    /// The read is in flight.
    Reading,
    /// `NBD_CMD_DISC` is queued or sent: waiting for the server to close.
    Leaving,
}

/// The client side: its machine and its fixed buffers.
#[derive(Debug, Clone)]
pub struct ClientSide {
    machine: Client<IN_FLIGHT>,
    /// Where the read lands: export offsets `DATA_OFFSET..DATA_OFFSET + DATA_LEN`.
    read_buf: [u8; DATA_LEN],
    stage: Stage,
    /// The command in flight.
    cookie: Option<Cookie>,
    /// Write payload still to put on the wire: (index into `WRITE_DATA`, bytes left).
    payload: Option<(usize, usize)>,
    eof_seen: bool,
}

impl ClientSide {
    /// A client for [`EXPORT`], waiting for the server's greeting.
    pub fn new() -> Result<Self, DemoError> {
        Ok(Self {
            machine: Client::new(&ClientConfig::new(EXPORT))?,
            read_buf: [0; DATA_LEN],
            stage: Stage::Handshake,
            cookie: None,
            payload: None,
            eof_seen: false,
        })
    }

    /// The machine, for its getters.
    pub fn machine(&self) -> &Client<IN_FLIGHT> {
        &self.machine
    }

    /// What the read brought back.
    pub fn read_data(&self) -> &[u8] {
        &self.read_buf
    }

    /// True once the session ended cleanly after the read.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Leaving && self.machine.state() == State::Closed
    }

    /// One round of the run loop: sends what fits into `tx`, then takes what it can from
    /// `rx`. Returns whether any byte or event moved.
    pub fn step<const C: usize>(
        &mut self,
        rx: &mut Pipe<C>,
        tx: &mut Pipe<C>,
    ) -> Result<bool, DemoError> {
        let sent = self.send(tx)?;
        let received = self.receive(rx, tx)?;
        Ok(sent || received)
    }

    /// Run-loop step 1: drain `poll_transmit`. Headers are encoded straight into the pipe's
    /// free space; the write payload is copied from `WRITE_DATA` as room allows.
    fn send<const C: usize>(&mut self, tx: &mut Pipe<C>) -> Result<bool, DemoError> {
        let mut progress = false;
        loop {
            if let Some((at, left)) = self.payload {
                let data = WRITE_DATA.get(at..at + left).ok_or(DemoError::Unexpected)?;
                let n = tx.push(data);
                progress |= n > 0;
                if n < left {
                    self.payload = Some((at + n, left - n));
                    return Ok(progress);
                }
                self.payload = None;
            }
            match self.machine.poll_transmit(tx.space()) {
                Ok(None) => return Ok(progress),
                Ok(Some(Transmit::Bytes(n))) => {
                    tx.commit(n);
                    progress = true;
                }
                Ok(Some(Transmit::Payload { offset, len, .. })) => {
                    let at = offset
                        .checked_sub(DATA_OFFSET)
                        .ok_or(DemoError::Unexpected)?;
                    self.payload = Some((at as usize, len));
                }
                Ok(Some(_)) => return Err(DemoError::Unexpected),
                // Not fatal, nothing changed: wait until the peer has read some bytes.
                Err(Error::BufferTooSmall { .. }) => return Ok(progress),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Run-loop steps 2 and 3: act on `wants()` until `rx` has nothing more to give.
    fn receive<const C: usize>(
        &mut self,
        rx: &mut Pipe<C>,
        tx: &mut Pipe<C>,
    ) -> Result<bool, DemoError> {
        let mut progress = false;
        loop {
            match self.machine.wants() {
                Want::Payload { offset, len, .. } => {
                    // Read data goes from the transport straight into `read_buf`.
                    let n = len.min(rx.data().len());
                    if n == 0 {
                        break;
                    }
                    let at = offset
                        .checked_sub(DATA_OFFSET)
                        .ok_or(DemoError::Unexpected)? as usize;
                    let dest = self
                        .read_buf
                        .get_mut(at..at + n)
                        .ok_or(DemoError::Unexpected)?;
                    dest.copy_from_slice(&rx.data()[..n]);
                    rx.consume(n);
                    self.machine.handle_payload(n)?;
                    progress = true;
                }
                Want::Bytes(n) if rx.data().len() >= n => {
                    let handled = self.machine.handle_input(rx.data())?;
                    let (consumed, moved) = (handled.consumed, handled.event.is_some());
                    if let Some(event) = handled.event {
                        self.on_event(event)?;
                    }
                    rx.consume(consumed);
                    if consumed == 0 && !moved {
                        break;
                    }
                    progress = true;
                    // What the event queued (the next option, a command) goes out before
                    // more input is read: a reply must never be seen before its request
                    // was sent (run-loop step 4).
                    self.send(tx)?;
                }
                _ => {
                    if rx.at_eof() && !self.eof_seen {
                        self.eof_seen = true;
                        self.machine.handle_eof()?;
                        progress = true;
                    }
                    break;
                }
            }
        }
        Ok(progress)
    }

    fn on_event(&mut self, event: Event<'_>) -> Result<(), DemoError> {
        match event {
            Event::Ready { .. } => {
                self.stage = Stage::Writing;
                self.cookie = Some(self.machine.write(
                    DATA_OFFSET,
                    DATA_LEN as u32,
                    CmdFlags::empty(),
                )?);
            }
            Event::ReadHole { offset, len, .. } => {
                let at = offset
                    .checked_sub(DATA_OFFSET)
                    .ok_or(DemoError::Unexpected)? as usize;
                self.read_buf
                    .get_mut(at..at + len as usize)
                    .ok_or(DemoError::Unexpected)?
                    .fill(0);
            }
            Event::Done { cookie, result } if Some(cookie) == self.cookie => {
                result.map_err(|_| DemoError::Refused)?;
                match self.stage {
                    Stage::Writing => {
                        self.stage = Stage::Reading;
                        self.cookie = Some(self.machine.read(
                            DATA_OFFSET,
                            DATA_LEN as u32,
                            CmdFlags::empty(),
                        )?);
                    }
                    Stage::Reading => {
                        self.stage = Stage::Leaving;
                        self.cookie = None;
                        self.machine.disconnect()?;
                    }
                    Stage::Handshake | Stage::Leaving => return Err(DemoError::Unexpected),
                }
            }
            Event::Done { .. } | Event::Abandoned { .. } => return Err(DemoError::Unexpected),
            // Greeting, option replies, read data (moved in `receive`): nothing to do.
            _ => {}
        }
        Ok(())
    }
}
