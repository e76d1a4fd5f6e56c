//! The server role: a [`Server`] machine serving a [`DISK_LEN`]-byte RAM disk held in a
//! fixed array, as export [`EXPORT`].

use nbd_proto::server::{ExportInfo, Server, ServerConfig, ServerEvent};
use nbd_proto::wire::{Command, Errno, OptError, Request, TransmissionFlags};
use nbd_proto::{Error, Transmit, Want};

use crate::{DemoError, Pipe, DISK_LEN, EXPORT, IN_FLIGHT, SERVER_OUTPUT};

/// Zeroes for holes in simple read replies.
static ZEROES: [u8; 64] = [0; 64];

/// What the server still has to put on the wire beside the machine's own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    /// Read data from the disk: (disk offset, bytes left).
    Data(usize, usize),
    /// Zero bytes left to send.
    Zeroes(usize),
}

/// The server side: its machine and its RAM disk.
#[derive(Debug, Clone)]
pub struct ServerSide {
    machine: Server<IN_FLIGHT, SERVER_OUTPUT>,
    disk: [u8; DISK_LEN],
    outgoing: Option<Outgoing>,
    eof_seen: bool,
}

impl ServerSide {
    /// A server with a zeroed disk; its greeting is queued.
    pub fn new() -> Self {
        Self {
            machine: Server::new(ServerConfig::default()),
            disk: [0; DISK_LEN],
            outgoing: None,
            eof_seen: false,
        }
    }

    /// The machine, for its getters.
    pub fn machine(&self) -> &Server<IN_FLIGHT, SERVER_OUTPUT> {
        &self.machine
    }

    /// The disk's contents.
    pub fn disk(&self) -> &[u8] {
        &self.disk
    }

    /// True once the session is over and every byte was handed to the transport: close it.
    pub fn is_done(&self) -> bool {
        self.machine.is_finished() && self.outgoing.is_none()
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

    /// Run-loop step 1: drain `poll_transmit`. Reply headers are encoded straight into the
    /// pipe's free space; read data is copied from the disk as room allows.
    fn send<const C: usize>(&mut self, tx: &mut Pipe<C>) -> Result<bool, DemoError> {
        let mut progress = false;
        loop {
            match self.outgoing {
                Some(Outgoing::Data(at, left)) => {
                    let data = self.disk.get(at..at + left).ok_or(DemoError::Unexpected)?;
                    let n = tx.push(data);
                    progress |= n > 0;
                    if n < left {
                        self.outgoing = Some(Outgoing::Data(at + n, left - n));
                        return Ok(progress);
                    }
                }
                Some(Outgoing::Zeroes(left)) => {
                    let n = tx.push(&ZEROES[..left.min(ZEROES.len())]);
                    progress |= n > 0;
                    if n < left {
                        self.outgoing = Some(Outgoing::Zeroes(left - n));
                        return Ok(progress);
                    }
                }
                None => {}
            }
            self.outgoing = None;
            match self.machine.poll_transmit(tx.space()) {
                Ok(None) => return Ok(progress),
                Ok(Some(Transmit::Bytes(n))) => {
                    tx.commit(n);
                    progress = true;
                }
                Ok(Some(Transmit::Payload { offset, len, .. })) => {
                    self.outgoing = Some(Outgoing::Data(offset as usize, len));
                }
                Ok(Some(Transmit::Zeroes { len, .. })) => {
                    self.outgoing = Some(Outgoing::Zeroes(len));
                }
                Ok(Some(_)) => return Err(DemoError::Unexpected),
                // The pipe is full (or empty space is 0): wait for the peer to read.
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
                Want::Payload {
                    cookie,
                    offset,
                    len,
                } => {
                    // Write data goes from the transport straight onto the disk.
                    let n = len.min(rx.data().len());
                    if n == 0 {
                        break;
                    }
                    let at = offset as usize;
                    let dest = self.disk.get_mut(at..at + n).ok_or(DemoError::Unexpected)?;
                    dest.copy_from_slice(&rx.data()[..n]);
                    rx.consume(n);
                    self.machine.handle_payload(n)?;
                    if n == len {
                        self.machine.reply(cookie, Ok(()))?;
                    }
                    progress = true;
                }
                Want::Discard { len } => {
                    let n = len.min(rx.data().len());
                    if n == 0 {
                        break;
                    }
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
                    // Answers are queued: send them before reading on (run-loop step 4).
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

    fn on_event(&mut self, event: ServerEvent<'_>) -> Result<(), DemoError> {
        match event {
            ServerEvent::List => {
                self.machine.answer_list_entry(EXPORT, "a RAM disk")?;
                self.machine.answer_ack()?;
            }
            ServerEvent::Export(query) if query.name == EXPORT || query.name.is_empty() => {
                let flags = TransmissionFlags::SEND_FLUSH
                    | TransmissionFlags::SEND_FUA
                    | TransmissionFlags::SEND_TRIM
                    | TransmissionFlags::SEND_WRITE_ZEROES;
                self.machine
                    .answer_export(&ExportInfo::new(DISK_LEN as u64, flags))?;
            }
            ServerEvent::Export(_) => self
                .machine
                .answer_error(OptError::UnknownExport, "no such export")?,
            // No metadata contexts on this disk: an empty selection.
            ServerEvent::MetaContexts(_) => self.machine.answer_ack()?,
            ServerEvent::Request { request, .. } => self.request(request)?,
            // The machine refuses STARTTLS itself (TLS is off); DISC needs nothing from us.
            _ => {}
        }
        Ok(())
    }

    /// Serves one request (already checked by the machine against the export).
    fn request(&mut self, r: Request) -> Result<(), DemoError> {
        let range = r.offset as usize..(r.offset + r.len) as usize;
        match r.command {
            // The machine queues the header, then asks for the data (`Transmit::Payload`).
            Command::Read => self
                .machine
                .reply_read_data(r.cookie, r.offset, r.len as usize)?,
            // The payload follows: `Want::Payload`, handled in `receive`.
            Command::Write => {}
            Command::Flush | Command::Cache => self.machine.reply(r.cookie, Ok(()))?,
            Command::Trim | Command::WriteZeroes => {
                self.disk
                    .get_mut(range)
                    .ok_or(DemoError::Unexpected)?
                    .fill(0);
                self.machine.reply(r.cookie, Ok(()))?;
            }
            _ => self.machine.reply(r.cookie, Err(Errno::Inval))?,
        }
        Ok(())
    }
}

impl Default for ServerSide {
    fn default() -> Self {
        Self::new()
    }
}
