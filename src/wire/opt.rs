//! Option requests, sent by the client during fixed-newstyle negotiation
//! (proto.md "Option types").
//!
//! ```text
//! C: 64 bits  IHAVEOPT (0x49484156454F5054)
//!    32 bits  option
//!    32 bits  length of option data L
//!    L bytes  option data
//!
//! NBD_OPT_INFO / NBD_OPT_GO data:
//!    32 bits  length of name N (N <= L - 6)
//!    N bytes  export name
//!    16 bits  number of information requests R
//!  R*16 bits  information types
//!
//! NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data:
//!    32 bits  length of export name N
//!    N bytes  export name
//!    32 bits  number of queries Q
//!    Q times: 32 bits length of query K, K bytes query
//! ```
//!
//! Decoding is strict about structure: a length that points past the data, or data left
//! over after the last field, is [`Error::BadLength`], which a server answers with
//! `NBD_REP_ERR_INVALID`. Data attached to `NBD_OPT_ABORT` is ignored, as the spec tells
//! servers to do.

use core::fmt;

use byteorder::{ByteOrder, NetworkEndian};

use super::{
    check_str, enum_with_unknown, need, parse_str, room, total_len, Error, Field, InfoType, Result,
    OPTS_MAGIC,
};

enum_with_unknown! {
    /// An option type (`NBD_OPT_*`, 32 bits).
    ///
    /// Value 4 (`NBD_OPT_PEEK_EXPORT`) was withdrawn and is treated as unknown.
    pub enum OptCode(u32) {
        /// `NBD_OPT_EXPORT_NAME` (1): choose an export and enter transmission (no reply header).
        ExportName = 1, "NBD_OPT_EXPORT_NAME",
        /// `NBD_OPT_ABORT` (2): end the session during negotiation.
        Abort = 2, "NBD_OPT_ABORT",
        /// `NBD_OPT_LIST` (3): list the exports.
        List = 3, "NBD_OPT_LIST",
        /// `NBD_OPT_STARTTLS` (5): upgrade the connection to TLS.
        StartTls = 5, "NBD_OPT_STARTTLS",
        /// `NBD_OPT_INFO` (6): describe an export without entering transmission.
        Info = 6, "NBD_OPT_INFO",
        /// `NBD_OPT_GO` (7): describe an export and enter transmission.
        Go = 7, "NBD_OPT_GO",
        /// `NBD_OPT_STRUCTURED_REPLY` (8): enable structured replies.
        StructuredReply = 8, "NBD_OPT_STRUCTURED_REPLY",
        /// `NBD_OPT_LIST_META_CONTEXT` (9): list metadata contexts.
        ListMetaContext = 9, "NBD_OPT_LIST_META_CONTEXT",
        /// `NBD_OPT_SET_META_CONTEXT` (10): select metadata contexts.
        SetMetaContext = 10, "NBD_OPT_SET_META_CONTEXT",
        /// `NBD_OPT_EXTENDED_HEADERS` (11): enable extended (64-bit) headers.
        ExtendedHeaders = 11, "NBD_OPT_EXTENDED_HEADERS",
    }
}

mod field {
    use super::Field;
    pub(super) const MAGIC: Field = 0..8;
    pub(super) const OPTION: Field = 8..12;
    pub(super) const LENGTH: Field = 12..16;
}

/// The 16-byte header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptHeader {
    /// The option type.
    pub code: OptCode,
    /// Length of the option data that follows.
    pub len: u32,
}

impl OptHeader {
    /// Length on the wire.
    pub const LEN: usize = 16;

    /// Decodes a header from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        need(buf, Self::LEN)?;
        match NetworkEndian::read_u64(&buf[field::MAGIC]) {
            OPTS_MAGIC => {}
            found => {
                return Err(Error::BadMagic {
                    what: "IHAVEOPT",
                    found,
                })
            }
        }
        Ok(Self {
            code: OptCode::from(NetworkEndian::read_u32(&buf[field::OPTION])),
            len: NetworkEndian::read_u32(&buf[field::LENGTH]),
        })
    }

    /// Length of the header plus its data.
    pub fn message_len(&self) -> Result<usize> {
        total_len(
            Self::LEN,
            self.len.into(),
            "option length does not fit in memory",
        )
    }

    /// Encodes into `buf`, returning the bytes written (16).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        room(buf, Self::LEN)?;
        NetworkEndian::write_u64(&mut buf[field::MAGIC], OPTS_MAGIC);
        NetworkEndian::write_u32(&mut buf[field::OPTION], self.code.into());
        NetworkEndian::write_u32(&mut buf[field::LENGTH], self.len);
        Ok(Self::LEN)
    }
}

/// A decoded option request, borrowing its strings from the input (or from the caller, when
/// built to be sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt<'a> {
    /// `NBD_OPT_EXPORT_NAME`: the whole data is the export name ("" = default export).
    ExportName {
        /// Export name.
        name: &'a str,
    },
    /// `NBD_OPT_ABORT` (any data is ignored).
    Abort,
    /// `NBD_OPT_LIST` (no data allowed).
    List,
    /// `NBD_OPT_STARTTLS` (no data allowed).
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(ExportRequest<'a>),
    /// `NBD_OPT_GO`.
    Go(ExportRequest<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY` (no data allowed).
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_EXTENDED_HEADERS` (no data allowed).
    ExtendedHeaders,
    /// Any other option, with its raw data. A server answers it with `NBD_REP_ERR_UNSUP`.
    Unknown {
        /// The option type.
        code: u32,
        /// Its data.
        data: &'a [u8],
    },
}

impl<'a> Opt<'a> {
    /// The option type.
    pub fn code(&self) -> OptCode {
        match self {
            Self::ExportName { .. } => OptCode::ExportName,
            Self::Abort => OptCode::Abort,
            Self::List => OptCode::List,
            Self::StartTls => OptCode::StartTls,
            Self::Info(_) => OptCode::Info,
            Self::Go(_) => OptCode::Go,
            Self::StructuredReply => OptCode::StructuredReply,
            Self::ListMetaContext(_) => OptCode::ListMetaContext,
            Self::SetMetaContext(_) => OptCode::SetMetaContext,
            Self::ExtendedHeaders => OptCode::ExtendedHeaders,
            Self::Unknown { code, .. } => OptCode::from(*code),
        }
    }

    /// Decodes the data of an option whose header said `code`; `data` is exactly the `L`
    /// bytes that followed the header.
    pub fn parse(code: OptCode, data: &'a [u8]) -> Result<Self> {
        let no_data = |opt: Self, what| {
            if data.is_empty() {
                Ok(opt)
            } else {
                Err(Error::BadLength {
                    what,
                    len: data.len() as u64,
                })
            }
        };
        match code {
            OptCode::ExportName => Ok(Self::ExportName {
                name: parse_str(data, "export name")?,
            }),
            OptCode::Abort => Ok(Self::Abort),
            OptCode::List => no_data(Self::List, "NBD_OPT_LIST carries no data"),
            OptCode::StartTls => no_data(Self::StartTls, "NBD_OPT_STARTTLS carries no data"),
            OptCode::Info => ExportRequest::parse(data).map(Self::Info),
            OptCode::Go => ExportRequest::parse(data).map(Self::Go),
            OptCode::StructuredReply => no_data(
                Self::StructuredReply,
                "NBD_OPT_STRUCTURED_REPLY carries no data",
            ),
            OptCode::ListMetaContext => MetaContextRequest::parse(data).map(Self::ListMetaContext),
            OptCode::SetMetaContext => MetaContextRequest::parse(data).map(Self::SetMetaContext),
            OptCode::ExtendedHeaders => no_data(
                Self::ExtendedHeaders,
                "NBD_OPT_EXTENDED_HEADERS carries no data",
            ),
            OptCode::Unknown(code) => Ok(Self::Unknown { code, data }),
        }
    }

    /// Decodes a whole option request (header and data) from the start of `buf`, returning
    /// it and the number of bytes it took.
    pub fn parse_message(buf: &'a [u8]) -> Result<(Self, usize)> {
        let header = OptHeader::parse(buf)?;
        let end = header.message_len()?;
        need(buf, end)?;
        Ok((Self::parse(header.code, &buf[OptHeader::LEN..end])?, end))
    }

    /// Length of the option data.
    pub fn data_len(&self) -> usize {
        match self {
            Self::ExportName { name } => name.len(),
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => 0,
            Self::Info(r) | Self::Go(r) => r.buffer_len(),
            Self::ListMetaContext(r) | Self::SetMetaContext(r) => r.buffer_len(),
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Length of the whole message (header and data).
    pub fn buffer_len(&self) -> usize {
        OptHeader::LEN + self.data_len()
    }

    /// Encodes the whole message into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let data_len = self.data_len();
        let len = u32::try_from(data_len).map_err(|_| Error::BadLength {
            what: "option data over 4 GiB",
            len: data_len as u64,
        })?;
        room(buf, OptHeader::LEN + data_len)?;
        // Validate before writing anything.
        match self {
            Self::ExportName { name } => check_str(name, "export name")?,
            Self::Info(r) | Self::Go(r) => r.check()?,
            Self::ListMetaContext(r) | Self::SetMetaContext(r) => r.check()?,
            _ => {}
        }
        OptHeader {
            code: self.code(),
            len,
        }
        .emit(buf)?;
        let data = &mut buf[OptHeader::LEN..OptHeader::LEN + data_len];
        match self {
            Self::ExportName { name } => data.copy_from_slice(name.as_bytes()),
            Self::Info(r) | Self::Go(r) => {
                r.emit(data)?;
            }
            Self::ListMetaContext(r) | Self::SetMetaContext(r) => {
                r.emit(data)?;
            }
            Self::Unknown { data: raw, .. } => data.copy_from_slice(raw),
            _ => {}
        }
        Ok(OptHeader::LEN + data_len)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information types
/// the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportRequest<'a> {
    /// Export name ("" = default export).
    pub name: &'a str,
    /// Requested information types, in the order sent.
    pub infos: InfoList<'a>,
}

impl<'a> ExportRequest<'a> {
    /// Decodes the option data (all `L` bytes).
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        let (name, rest) = take_name(data, 6, "NBD_OPT_INFO/GO data shorter than 6 bytes")?;
        // take_name checked N <= L - 6, so at least the 2-byte count remains.
        let (count, rest) = match rest {
            [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
            _ => {
                return Err(Error::BadLength {
                    what: "NBD_OPT_INFO/GO data too short",
                    len: data.len() as u64,
                })
            }
        };
        if rest.len() != 2 * count {
            return Err(Error::BadLength {
                what: "NBD_OPT_INFO/GO data length does not match the information request count",
                len: data.len() as u64,
            });
        }
        Ok(Self {
            name,
            infos: InfoList(InfoListInner::Wire(rest)),
        })
    }

    /// Length of the encoded data.
    pub fn buffer_len(&self) -> usize {
        4 + self.name.len() + 2 + 2 * self.infos.len()
    }

    fn check(&self) -> Result<()> {
        check_str(self.name, "export name")?;
        if self.infos.len() > usize::from(u16::MAX) {
            return Err(Error::BadLength {
                what: "more than 65535 information requests",
                len: self.infos.len() as u64,
            });
        }
        Ok(())
    }

    /// Encodes the option data into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        self.check()?;
        let len = self.buffer_len();
        room(buf, len)?;
        let mut at = put_name(buf, self.name);
        // invariant: check() bounded the count to u16.
        NetworkEndian::write_u16(&mut buf[at..at + 2], self.infos.len() as u16);
        at += 2;
        for info in self.infos.iter() {
            NetworkEndian::write_u16(&mut buf[at..at + 2], info.into());
            at += 2;
        }
        Ok(at)
    }
}

/// The information types of an `NBD_OPT_INFO`/`NBD_OPT_GO` request: either decoded wire
/// bytes or a caller's slice. Compares equal by content.
#[derive(Clone, Copy)]
pub struct InfoList<'a>(InfoListInner<'a>);

#[derive(Clone, Copy)]
enum InfoListInner<'a> {
    /// 2 bytes per entry (even length, checked at parse).
    Wire(&'a [u8]),
    Types(&'a [InfoType]),
}

impl<'a> InfoList<'a> {
    /// A list to send.
    pub const fn new(types: &'a [InfoType]) -> Self {
        Self(InfoListInner::Types(types))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self.0 {
            InfoListInner::Wire(b) => b.len() / 2,
            InfoListInner::Types(t) => t.len(),
        }
    }

    /// True if no information was requested.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if `info` was requested.
    pub fn contains(&self, info: InfoType) -> bool {
        self.iter().any(|i| i == info)
    }

    /// The entries, in order.
    pub fn iter(&self) -> InfoIter<'a> {
        InfoIter(*self, 0)
    }
}

impl<'a> IntoIterator for InfoList<'a> {
    type Item = InfoType;
    type IntoIter = InfoIter<'a>;
    fn into_iter(self) -> InfoIter<'a> {
        self.iter()
    }
}

impl PartialEq for InfoList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}
impl Eq for InfoList<'_> {}

impl fmt::Debug for InfoList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over an [`InfoList`].
#[derive(Debug, Clone)]
pub struct InfoIter<'a>(InfoList<'a>, usize);

impl Iterator for InfoIter<'_> {
    type Item = InfoType;

    fn next(&mut self) -> Option<InfoType> {
        let item = match (self.0).0 {
            InfoListInner::Wire(b) => {
                let bytes = b.get(2 * self.1..2 * self.1 + 2)?;
                InfoType::from(NetworkEndian::read_u16(bytes))
            }
            InfoListInner::Types(t) => *t.get(self.1)?,
        };
        self.1 += 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.0.len().saturating_sub(self.1);
        (n, Some(n))
    }
}

impl ExactSizeIterator for InfoIter<'_> {}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: an export name
/// and a list of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub export: &'a str,
    /// Queries such as `base:allocation`, `qemu:` or `qemu:dirty-bitmap:bm0`.
    pub queries: Queries<'a>,
}

impl<'a> MetaContextRequest<'a> {
    /// Decodes the option data (all `L` bytes). Every query is checked against the string
    /// rules here, so iterating [`Queries`] later cannot fail.
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        let (export, rest) = take_name(data, 8, "meta context request shorter than 8 bytes")?;
        let (count, mut rest) = split_u32(rest).ok_or(Error::BadLength {
            what: "meta context export name length leaves no room for the query count",
            len: data.len() as u64,
        })?;
        let queries_start = data.len() - rest.len();
        // Each query takes at least 4 bytes, so this loop is bounded by the data length.
        for _ in 0..count {
            let (len, after) = split_u32(rest).ok_or(Error::BadLength {
                what: "meta context query count exceeds the data",
                len: u64::from(count),
            })?;
            let len = len as usize;
            let query = after.get(..len).ok_or(Error::BadLength {
                what: "meta context query length exceeds the data",
                len: len as u64,
            })?;
            parse_str(query, "meta context query")?;
            rest = &after[len..];
        }
        if !rest.is_empty() {
            return Err(Error::BadLength {
                what: "bytes left over after the last meta context query",
                len: rest.len() as u64,
            });
        }
        Ok(Self {
            export,
            queries: Queries(QueriesInner::Wire {
                bytes: &data[queries_start..],
                count,
            }),
        })
    }

    /// Length of the encoded data.
    pub fn buffer_len(&self) -> usize {
        4 + self.export.len() + 4 + self.queries.iter().map(|q| 4 + q.len()).sum::<usize>()
    }

    fn check(&self) -> Result<()> {
        check_str(self.export, "export name")?;
        if u32::try_from(self.queries.len()).is_err() {
            return Err(Error::BadLength {
                what: "more than 2^32 - 1 queries",
                len: self.queries.len() as u64,
            });
        }
        self.queries
            .iter()
            .try_for_each(|q| check_str(q, "meta context query"))
    }

    /// Encodes the option data into `buf`, returning the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        self.check()?;
        let len = self.buffer_len();
        room(buf, len)?;
        let mut at = put_name(buf, self.export);
        // invariant: check() bounded the count to u32.
        NetworkEndian::write_u32(&mut buf[at..at + 4], self.queries.len() as u32);
        at += 4;
        for q in self.queries.iter() {
            at = at + put_name(&mut buf[at..], q);
        }
        Ok(at)
    }
}

/// The queries of a meta context request: decoded wire bytes or a caller's slice of
/// strings. Compares equal by content.
#[derive(Clone, Copy)]
pub struct Queries<'a>(QueriesInner<'a>);

#[derive(Clone, Copy)]
enum QueriesInner<'a> {
    /// `count` length-prefixed strings, all checked at parse.
    Wire {
        bytes: &'a [u8],
        count: u32,
    },
    Strs(&'a [&'a str]),
}

impl<'a> Queries<'a> {
    /// A list to send.
    pub const fn new(queries: &'a [&'a str]) -> Self {
        Self(QueriesInner::Strs(queries))
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        match self.0 {
            QueriesInner::Wire { count, .. } => count as usize,
            QueriesInner::Strs(s) => s.len(),
        }
    }

    /// True if there is no query.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queries, in order.
    pub fn iter(&self) -> QueryIter<'a> {
        QueryIter {
            queries: *self,
            index: 0,
            at: 0,
        }
    }
}

impl<'a> IntoIterator for Queries<'a> {
    type Item = &'a str;
    type IntoIter = QueryIter<'a>;
    fn into_iter(self) -> QueryIter<'a> {
        self.iter()
    }
}

impl PartialEq for Queries<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}
impl Eq for Queries<'_> {}

impl fmt::Debug for Queries<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over [`Queries`].
#[derive(Debug, Clone)]
pub struct QueryIter<'a> {
    queries: Queries<'a>,
    index: usize,
    at: usize,
}

impl<'a> Iterator for QueryIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.index >= self.queries.len() {
            return None;
        }
        let item = match self.queries.0 {
            QueriesInner::Wire { bytes, .. } => {
                let (len, rest) = split_u32(bytes.get(self.at..)?)?;
                let query = rest.get(..len as usize)?;
                self.at += 4 + query.len();
                // Checked at parse; a failure here would mean a bug, so end the iteration.
                core::str::from_utf8(query).ok()?
            }
            QueriesInner::Strs(s) => s.get(self.index)?,
        };
        self.index += 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.queries.len().saturating_sub(self.index);
        (n, Some(n))
    }
}

/// Splits a leading big-endian u32 off `buf`.
pub(crate) fn split_u32(buf: &[u8]) -> Option<(u32, &[u8])> {
    let head = buf.get(..4)?;
    Some((NetworkEndian::read_u32(head), &buf[4..]))
}

/// Reads a 32-bit length and that many bytes of name; `min` is the smallest valid data
/// length (the spec's "N <= L - min" bound).
fn take_name<'a>(data: &'a [u8], min: usize, short: &'static str) -> Result<(&'a str, &'a [u8])> {
    if data.len() < min {
        return Err(Error::BadLength {
            what: short,
            len: data.len() as u64,
        });
    }
    let (len, rest) = split_u32(data).ok_or(Error::BadLength {
        what: short,
        len: 0,
    })?;
    let len = len as usize;
    if len > data.len() - min {
        return Err(Error::BadLength {
            what: "export name length exceeds the data",
            len: len as u64,
        });
    }
    Ok((parse_str(&rest[..len], "export name")?, &rest[len..]))
}

/// Writes a 32-bit length and the string; the caller checked the room.
fn put_name(buf: &mut [u8], s: &str) -> usize {
    NetworkEndian::write_u32(&mut buf[..4], s.len() as u32);
    buf[4..4 + s.len()].copy_from_slice(s.as_bytes());
    4 + s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::strategies::*;
    use proptest::prelude::*;

    // spec-digest 7: NBD_OPT_GO "disk" with one info request NBD_INFO_BLOCK_SIZE.
    static GO: [u8; 28] = [
        0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
        0x0c, 0x00, 0x00, 0x00, 0x04, 0x64, 0x69, 0x73, 0x6b, 0x00, 0x01, 0x00, 0x03,
    ];
    // spec-digest 7: NBD_OPT_SET_META_CONTEXT "disk", one query "base:allocation".
    static SET_META: [u8; 47] = [
        0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00,
        0x1f, 0x00, 0x00, 0x00, 0x04, 0x64, 0x69, 0x73, 0x6b, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
        0x00, 0x0f, b'b', b'a', b's', b'e', b':', b'a', b'l', b'l', b'o', b'c', b'a', b't', b'i',
        b'o', b'n',
    ];
    static STRUCTURED: [u8; 16] = [
        0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 0x08, 0, 0, 0, 0,
    ];
    static EXTENDED: [u8; 16] = [
        0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 0x0b, 0, 0, 0, 0,
    ];

    fn emitted(opt: &Opt<'_>) -> Vec<u8> {
        let mut buf = vec![0xa5; opt.buffer_len()];
        assert_eq!(opt.emit(&mut buf), Ok(buf.len()));
        buf
    }

    #[test]
    fn go_vector() {
        let (opt, n) = Opt::parse_message(&GO).unwrap();
        assert_eq!(n, 28);
        let Opt::Go(req) = opt else { panic!("{opt:?}") };
        assert_eq!(req.name, "disk");
        assert_eq!(req.infos.iter().collect::<Vec<_>>(), [InfoType::BlockSize]);
        let built = Opt::Go(ExportRequest {
            name: "disk",
            infos: InfoList::new(&[InfoType::BlockSize]),
        });
        assert_eq!(built, opt);
        assert_eq!(emitted(&built), GO);
    }

    #[test]
    fn set_meta_context_vector() {
        let (opt, n) = Opt::parse_message(&SET_META).unwrap();
        assert_eq!(n, 47);
        let Opt::SetMetaContext(req) = opt else {
            panic!("{opt:?}")
        };
        assert_eq!(req.export, "disk");
        assert_eq!(req.queries.iter().collect::<Vec<_>>(), ["base:allocation"]);
        let built = Opt::SetMetaContext(MetaContextRequest {
            export: "disk",
            queries: Queries::new(&["base:allocation"]),
        });
        assert_eq!(built, opt);
        assert_eq!(emitted(&built), SET_META);
    }

    #[test]
    fn dataless_vectors() {
        assert_eq!(
            Opt::parse_message(&STRUCTURED),
            Ok((Opt::StructuredReply, 16))
        );
        assert_eq!(
            Opt::parse_message(&EXTENDED),
            Ok((Opt::ExtendedHeaders, 16))
        );
        assert_eq!(emitted(&Opt::StructuredReply), STRUCTURED);
        assert_eq!(emitted(&Opt::ExtendedHeaders), EXTENDED);
        assert_eq!(
            OptHeader::parse(&EXTENDED),
            Ok(OptHeader {
                code: OptCode::ExtendedHeaders,
                len: 0
            })
        );
    }

    #[test]
    fn export_name_and_unknown() {
        let opt = Opt::ExportName { name: "" };
        assert_eq!(
            emitted(&opt),
            [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let unknown = Opt::Unknown {
            code: 99,
            data: b"xyz",
        };
        let bytes = emitted(&unknown);
        assert_eq!(Opt::parse_message(&bytes), Ok((unknown, 19)));
        assert_eq!(
            Opt::parse(OptCode::from(4), b""),
            Ok(Opt::Unknown { code: 4, data: b"" })
        );
    }

    #[test]
    fn truncated_prefixes() {
        for msg in [&GO[..], &SET_META[..], &STRUCTURED[..]] {
            for k in 0..msg.len() {
                let want = if k < 16 { 16 - k } else { msg.len() - k };
                assert_eq!(
                    Opt::parse_message(&msg[..k]),
                    Err(Error::Truncated { needed: want })
                );
            }
        }
    }

    #[test]
    fn dataless_options_reject_data() {
        for code in [
            OptCode::List,
            OptCode::StartTls,
            OptCode::StructuredReply,
            OptCode::ExtendedHeaders,
        ] {
            assert!(
                matches!(Opt::parse(code, b"x"), Err(Error::BadLength { .. })),
                "{code}"
            );
        }
        // proto.md: the server SHOULD ignore data sent with NBD_OPT_ABORT.
        assert_eq!(Opt::parse(OptCode::Abort, b"junk"), Ok(Opt::Abort));
    }

    #[test]
    fn malformed_go_data() {
        // Shorter than 6 bytes.
        assert!(matches!(
            ExportRequest::parse(&[0, 0, 0, 0, 0]),
            Err(Error::BadLength { .. })
        ));
        // Name length past the data.
        assert!(matches!(
            ExportRequest::parse(&[0, 0, 0, 5, b'a', 0, 0]),
            Err(Error::BadLength { .. })
        ));
        // Huge name length must not overflow.
        assert!(matches!(
            ExportRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]),
            Err(Error::BadLength { .. })
        ));
        // Count says 2, one present; trailing byte.
        assert!(matches!(
            ExportRequest::parse(&[0, 0, 0, 0, 0, 2, 0, 3]),
            Err(Error::BadLength { .. })
        ));
        assert!(matches!(
            ExportRequest::parse(&[0, 0, 0, 0, 0, 0, 9]),
            Err(Error::BadLength { .. })
        ));
        // Name with a NUL.
        assert!(matches!(
            ExportRequest::parse(&[0, 0, 0, 1, 0, 0, 0]),
            Err(Error::BadString { .. })
        ));
        // A valid, empty request.
        assert_eq!(
            ExportRequest::parse(&[0, 0, 0, 0, 0, 0]),
            Ok(ExportRequest {
                name: "",
                infos: InfoList::new(&[])
            })
        );
    }

    #[test]
    fn malformed_meta_context_data() {
        // Query count larger than the data can hold, without looping 2^32 times.
        assert!(matches!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(Error::BadLength { .. })
        ));
        // Query length past the end.
        assert!(matches!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'a']),
            Err(Error::BadLength { .. })
        ));
        // Trailing bytes.
        assert!(matches!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(Error::BadLength { .. })
        ));
        // Bad UTF-8 in a query.
        assert!(matches!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xff]),
            Err(Error::BadString { .. })
        ));
        let empty = MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(empty.queries.is_empty());
    }

    #[test]
    fn emit_refuses_bad_strings() {
        let long = "x".repeat(4097);
        let opt = Opt::ExportName { name: &long };
        let mut buf = vec![0; opt.buffer_len()];
        assert!(matches!(opt.emit(&mut buf), Err(Error::BadString { .. })));
        let q = ["a\0b"];
        let opt = Opt::ListMetaContext(MetaContextRequest {
            export: "",
            queries: Queries::new(&q),
        });
        let mut buf = vec![0; opt.buffer_len()];
        assert!(matches!(opt.emit(&mut buf), Err(Error::BadString { .. })));
        let mut small = [0u8; 15];
        assert_eq!(
            Opt::List.emit(&mut small),
            Err(Error::BufferTooSmall { required: 16 })
        );
    }

    proptest! {
        #[test]
        fn opt_roundtrip(o in opt_owned()) {
            let opt = o.as_opt();
            let bytes = emitted(&opt);
            prop_assert_eq!(Opt::parse_message(&bytes), Ok((opt, bytes.len())));
        }

        #[test]
        fn opt_arbitrary_bytes(bytes in option_bytes()) {
            if let Ok((opt, n)) = Opt::parse_message(&bytes) {
                let out = emitted(&opt);
                if opt == Opt::Abort {
                    // Data attached to NBD_OPT_ABORT is ignored (documented non-canonical).
                    prop_assert_eq!(&out[..12], &bytes[..12]);
                } else {
                    prop_assert_eq!(&out[..], &bytes[..n]);
                }
            }
        }
    }
}
