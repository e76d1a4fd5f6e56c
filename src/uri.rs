//! NBD URIs (`doc/uri.md` of NetworkBlockDevice/nbd):
//!
//! ```text
//! nbd://[user@]host[:port]/export?query       TCP, TLS optional
//! nbds://[user@]host[:port]/export?query      TCP, TLS required
//! nbd+unix:///export?socket=PATH&query         Unix socket, TLS optional
//! nbds+unix:///export?socket=PATH&query        Unix socket, TLS required
//! ```
//!
//! The export name is the path without its single leading `/`, percent-decoded
//! (`nbd://h//disk` names `/disk`; `nbd://h` and `nbd://h/` the default export). IPv6
//! literals go in brackets; the port defaults to 10809. Query parameters the spec defines
//! (`socket`, `tls-type`, `tls-hostname`, `tls-verify-peer`) and libnbd's
//! `tls-certificates` are decoded; any other one is kept in [`NbdUri::unknown_params`] for
//! the caller to report, as the spec asks.

use core::fmt;
use std::borrow::ToOwned;
use std::string::String;
use std::vec::Vec;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// TCP to `host` (a name, an IPv4 address, or an IPv6 address without brackets).
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket (a leading NUL byte names a Linux abstract socket).
    Unix {
        /// Socket path.
        socket: String,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdUri {
    /// Where to connect.
    pub transport: Transport,
    /// Export name ("" = default export).
    pub export: String,
    /// TLS is mandatory (`nbds` schemes): fail rather than fall back to plaintext.
    pub tls: bool,
    /// The user name of the authority, for TLS methods that use one.
    pub user: Option<String>,
    /// `tls-type`: `anon`, `x509` or `psk`.
    pub tls_type: Option<String>,
    /// `tls-hostname`: the name to check the certificate against.
    pub tls_hostname: Option<String>,
    /// `tls-verify-peer`: `Some(false)` for `0`, `Some(true)` for `1`.
    pub tls_verify_peer: Option<bool>,
    /// `tls-certificates` (libnbd's parameter): a directory with `ca-cert.pem` to trust, and
    /// optionally `client-cert.pem` and `client-key.pem` to present.
    pub tls_certificates: Option<String>,
    /// Query parameters this parser does not know (decoded), in order: report them.
    pub unknown_params: Vec<(String, String)>,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UriError {
    /// Not `scheme://...`, or a scheme other than the four NBD ones.
    Scheme,
    /// A bad authority: empty host for TCP, unclosed IPv6 bracket, bad port.
    Authority,
    /// A `%` escape that is not two hex digits, or decoded bytes that are not UTF-8.
    Encoding,
    /// A Unix scheme without `socket=`.
    MissingSocket,
    /// A parameter with an invalid value (e.g. `tls-verify-peer=2`).
    BadParam(String),
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scheme => f.write_str("not an NBD URI (nbd, nbds, nbd+unix or nbds+unix)"),
            Self::Authority => f.write_str("bad host or port in NBD URI"),
            Self::Encoding => f.write_str("bad percent-encoding in NBD URI"),
            Self::MissingSocket => f.write_str("Unix-socket NBD URI without socket="),
            Self::BadParam(p) => write!(f, "bad value for NBD URI parameter {p}"),
        }
    }
}

impl core::error::Error for UriError {}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let (scheme, rest) = uri.split_once("://").ok_or(UriError::Scheme)?;
        let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::Scheme),
        };
        // A fragment means nothing here.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path)?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(decode(u)?), h),
            None => (None, authority),
        };
        let mut out = Self {
            transport: Transport::Unix {
                socket: String::new(),
            },
            export,
            tls,
            user,
            tls_type: None,
            tls_hostname: None,
            tls_verify_peer: None,
            tls_certificates: None,
            unknown_params: Vec::new(),
        };
        let mut socket = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            match k.as_str() {
                "socket" => socket = Some(v),
                "tls-type" => out.tls_type = Some(v),
                "tls-hostname" => out.tls_hostname = Some(v),
                "tls-certificates" => out.tls_certificates = Some(v),
                "tls-verify-peer" => {
                    out.tls_verify_peer = Some(match v.as_str() {
                        "0" | "false" => false,
                        "1" | "true" => true,
                        _ => return Err(UriError::BadParam(k)),
                    })
                }
                _ => out.unknown_params.push((k, v)),
            }
        }
        out.transport = if unix {
            // The spec: the authority SHOULD be empty for Unix sockets; it is ignored.
            Transport::Unix {
                socket: socket.ok_or(UriError::MissingSocket)?,
            }
        } else {
            if let Some(s) = socket {
                out.unknown_params.push(("socket".to_owned(), s));
            }
            let (host, port) = split_host_port(hostport)?;
            Transport::Tcp { host, port }
        };
        Ok(out)
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(UriError::Authority)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or(UriError::Authority)?)),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let host = decode(host)?;
    if host.is_empty() {
        return Err(UriError::Authority);
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| UriError::Authority)?,
    };
    Ok((host, port))
}

/// Percent-decodes `s` (RFC 3986), requiring UTF-8.
fn decode(s: &str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::Encoding)?;
            let hex = core::str::from_utf8(hex).map_err(|_| UriError::Encoding)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::Encoding)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn export_names_follow_the_spec_examples() {
        for (uri, export) in [
            ("nbd://h/disk", "disk"),
            ("nbd://h/", ""),
            ("nbd://h", ""),
            ("nbd://h//disk", "/disk"),
            ("nbd://h/hello%20world", "hello world"),
        ] {
            let u = NbdUri::parse(uri).unwrap();
            assert_eq!(u.export, export, "{uri}");
            assert_eq!(u.transport, tcp("h", 10809));
            assert!(!u.tls);
        }
    }

    #[test]
    fn schemes_ports_and_ipv6() {
        let u = NbdUri::parse("nbds://alice@example.com:10810/x?tls-type=x509").unwrap();
        assert!(u.tls);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.transport, tcp("example.com", 10810));
        assert_eq!(u.tls_type.as_deref(), Some("x509"));
        let u = NbdUri::parse("nbd://[::1]:1234/").unwrap();
        assert_eq!(u.transport, tcp("::1", 1234));
        let u = NbdUri::parse("NBD://[fe80::1]").unwrap();
        assert_eq!(u.transport, tcp("fe80::1", 10809));
        assert_eq!(NbdUri::parse("nbd://[::1/"), Err(UriError::Authority));
        assert_eq!(NbdUri::parse("nbd://h:x/"), Err(UriError::Authority));
        assert_eq!(NbdUri::parse("nbd:///disk"), Err(UriError::Authority));
        assert_eq!(NbdUri::parse("http://h/"), Err(UriError::Scheme));
        assert_eq!(NbdUri::parse("nbd:h"), Err(UriError::Scheme));
    }

    #[test]
    fn unix_sockets() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/tmp/s%20k.sock").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "/tmp/s k.sock".into()
            }
        );
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbds+unix://?socket=%00abstract").unwrap();
        assert!(u.tls);
        assert_eq!(u.export, "");
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "\0abstract".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk"),
            Err(UriError::MissingSocket)
        );
        let u = NbdUri::parse(
            "nbds+unix:///?socket=/s&tls-certificates=/etc/pki/my%20nbd&tls-hostname=localhost",
        )
        .unwrap();
        assert_eq!(u.tls_certificates.as_deref(), Some("/etc/pki/my nbd"));
        assert_eq!(u.tls_hostname.as_deref(), Some("localhost"));
        assert!(u.unknown_params.is_empty());
    }

    #[test]
    fn parameters() {
        let u = NbdUri::parse("nbd://h/?tls-hostname=srv&tls-verify-peer=0&x-foo=b%26r&socket=/s")
            .unwrap();
        assert_eq!(u.tls_hostname.as_deref(), Some("srv"));
        assert_eq!(u.tls_certificates, None);
        assert_eq!(u.tls_verify_peer, Some(false));
        assert_eq!(
            u.unknown_params,
            vec![
                ("x-foo".to_owned(), "b&r".to_owned()),
                ("socket".to_owned(), "/s".to_owned())
            ]
        );
        assert_eq!(
            NbdUri::parse("nbd://h/?tls-verify-peer=2"),
            Err(UriError::BadParam("tls-verify-peer".into()))
        );
        assert_eq!(NbdUri::parse("nbd://h/%zz"), Err(UriError::Encoding));
        assert_eq!(NbdUri::parse("nbd://h/%ff"), Err(UriError::Encoding));
        assert_eq!(NbdUri::parse("nbd://h/%4"), Err(UriError::Encoding));
    }
}
