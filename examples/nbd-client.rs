//! A small nbdinfo/nbdcopy-class tool over the blocking client.
//!
//! ```text
//! nbd-client info URI [--context QUERY]... [--json]
//! nbd-client list URI [--json]
//! nbd-client map  URI [--context NAME] [--json]
//! nbd-client read URI OFFSET LENGTH          > out
//! nbd-client write URI OFFSET                < in
//! nbd-client copy SRC DST [--requests N] [--request-size BYTES] [--connections N]
//!                         [--progress]
//! ```
//!
//! `info` lists the metadata contexts the server has for the export; `--context QUERY`
//! (repeatable) asks only for those matching QUERY, which may be a prefix like `qemu:`.
//!
//! SRC and DST are NBD URIs, file names, or `-` (stdin/stdout). Copies do not read the zero
//! regions an NBD source reports through `base:allocation`: they write zeroes there
//! (`NBD_CMD_WRITE_ZEROES`, or zero blocks when the destination cannot), since an NBD
//! destination is not known to read as zeroes, and leave them out of a regular destination
//! file, which is truncated and sized to the source first (to what was copied when the
//! source's size is unknown). All-zero blocks of other sources are written the same way.
//! `--connections N` needs both ends to be NBD servers offering `CAN_MULTI_CONN`; otherwise
//! the copy says so on stderr and uses one connection. `--progress` shows the progress on
//! stderr, updated in place on a terminal and as a line per update elsewhere (like
//! `nbdcopy --progress`, it is off unless asked for).
//!
//! Errors are one line on stderr naming the server (the URI; `source` or `destination` for
//! a copy) and what failed (the NBD errno, the rule the server broke, or the OS error), and
//! the exit status is 1.
//!
//! TLS (X.509, with rustls), as libnbd's URIs spell it:
//!
//! ```text
//! nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR              TLS required
//! nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR&tls-hostname=NAME
//! nbd://HOST/EXPORT?tls-certificates=DIR                      TLS if the server offers it
//! --tls-certificates DIR                                      DIR for every URI without one
//! ```
//!
//! * `DIR/ca-cert.pem` is the certificate authority to trust (there is no system trust
//!   store here); `DIR/client-cert.pem` and `DIR/client-key.pem`, if present, are the
//!   client's certificate for servers that ask for one.
//! * The server's certificate must name `tls-hostname=` if given, else the URI's host. Over
//!   a Unix socket `tls-hostname=` is needed. `tls-verify-peer=false` skips the checks
//!   (encryption without authentication).
//! * `nbds` never falls back to plaintext. `nbd` with certificates upgrades when the server
//!   accepts STARTTLS and stays in plaintext otherwise; `nbd` without certificates never
//!   tries TLS, so a server that requires TLS refuses it ("the server requires TLS").
//!   libnbd differs there: it never tries TLS on `nbd` URIs.
//! * Pre-shared keys (`tls-type=psk`, `tls-psk-file=`) are not supported.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nbd_proto::blocking::client::Stream;
use nbd_proto::blocking::{BlockingClient, NoSink, Sink, TlsConnector};
use nbd_proto::client::ClientConfig;
use nbd_proto::uri::{NbdUri, Transport};
use nbd_proto::wire::{extent, CmdFlags, Cookie, Extent, TransmissionFlags};

/// A client over a boxed stream, so that TLS can take it over.
type Nbd = BlockingClient<Box<dyn Stream>>;

/// `--tls-certificates DIR`: for URIs without `tls-certificates=`.
static TLS_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

const USAGE: &str = "usage:
  nbd-client info URI [--context QUERY]... [--json]
  nbd-client list URI [--json]
  nbd-client map URI [--context NAME] [--json]
  nbd-client read URI OFFSET LENGTH
  nbd-client write URI OFFSET
  nbd-client copy SRC DST [--requests N] [--request-size BYTES] [--connections N]
                          [--progress]
options for every command:
  --tls-certificates DIR   TLS with DIR/ca-cert.pem (and DIR/client-cert.pem, client-key.pem
                           if present) for URIs without tls-certificates=DIR
TLS URIs: nbds://HOST/EXPORT?tls-certificates=DIR (TLS required),
  nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR&tls-hostname=NAME,
  nbd://...?tls-certificates=DIR (TLS if the server offers it); tls-verify-peer=false
  skips certificate checks. More in nbd-client --help.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line; a closed stdout (e.g. `| head`) is not worth a message (a
            // broken connection to a server is).
            if !StdoutClosed::is(&e) {
                eprintln!("nbd-client: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Standard output was closed by its reader.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

impl StdoutClosed {
    /// Marks a broken pipe on standard output as such.
    fn mark(e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::BrokenPipe {
            io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
        } else {
            e
        }
    }

    fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|i| i.is::<StdoutClosed>())
    }
}

/// An error with what it concerns in front, e.g. `nbd+unix:///?socket=a.sock: input/output
/// error (NBD_EIO)` or `destination nbd://host/disk: ...`. The original error stays
/// reachable as its source, with its kind.
#[derive(Debug)]
struct Labelled {
    label: String,
    inner: io::Error,
}

impl std::fmt::Display for Labelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.label, self.inner)
    }
}

impl std::error::Error for Labelled {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

/// `label: e`, keeping the kind (a closed standard output stays unlabelled: it is not
/// reported).
fn labelled(label: &str, e: io::Error) -> io::Error {
    if StdoutClosed::is(&e) {
        return e;
    }
    io::Error::new(
        e.kind(),
        Labelled {
            label: label.to_owned(),
            inner: e,
        },
    )
}

/// `e` as the error of `what` (a command of the server, e.g. `read of 4096 bytes at 0`).
fn failed(what: impl std::fmt::Display, e: io::Error) -> io::Error {
    labelled(&what.to_string(), e)
}

fn usage(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{why}\n{USAGE}"))
}

/// Splits `args` into positional arguments and `--flag [value]` options.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(args: &[String], with_value: &[&str], flags: &[&str]) -> io::Result<Self> {
        let mut out = Self {
            positional: Vec::new(),
            options: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let (name, inline) = match name.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_owned())),
                    None => (name, None),
                };
                if with_value.contains(&name) {
                    let v = match inline {
                        Some(v) => v,
                        None => it
                            .next()
                            .cloned()
                            .ok_or_else(|| usage(&format!("--{name} needs a value")))?,
                    };
                    out.options.push((name.to_owned(), Some(v)));
                } else if flags.contains(&name) && inline.is_none() {
                    out.options.push((name.to_owned(), None));
                } else {
                    return Err(usage(&format!("unknown option --{name}")));
                }
            } else {
                out.positional.push(a.clone());
            }
        }
        Ok(out)
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| n == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value of a repeatable option, in order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.options
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    fn number(&self, name: &str, default: u64) -> io::Result<u64> {
        self.value(name).map_or(Ok(default), |v| {
            parse_size(v).ok_or_else(|| usage(&format!("bad --{name}")))
        })
    }

    fn exactly(&self, n: usize) -> io::Result<&[String]> {
        if self.positional.len() == n {
            Ok(&self.positional)
        } else {
            Err(usage("wrong number of arguments"))
        }
    }
}

/// Removes `--NAME VALUE` (or `--NAME=VALUE`) from anywhere in `args`: the last one wins.
fn take_global(args: &mut Vec<String>, name: &str) -> io::Result<Option<String>> {
    let flag = format!("--{name}");
    let mut value = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == flag {
            if i + 1 >= args.len() {
                return Err(usage(&format!("{flag} needs a value")));
            }
            value = Some(args.remove(i + 1));
            args.remove(i);
        } else if let Some(v) = args[i].strip_prefix(&format!("{flag}=")) {
            value = Some(v.to_owned());
            args.remove(i);
        } else {
            i += 1;
        }
    }
    Ok(value)
}

/// A number with an optional K/M/G suffix (powers of 1024).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

fn run(args: &[String]) -> io::Result<()> {
    let mut args = args.to_vec();
    let tls_dir = take_global(&mut args, "tls-certificates")?;
    let _ = TLS_DIR.set(tls_dir.map(PathBuf::from));
    let Some((cmd, rest)) = args.split_first() else {
        return Err(usage("no command"));
    };
    match cmd.as_str() {
        // Every error of a command on one server names the server's URI.
        "info" => {
            let a = Args::parse(rest, &["context"], &["json"])?;
            let uri = &a.exactly(1)?[0];
            info(uri, &a.values("context"), a.flag("json")).map_err(|e| labelled(uri, e))
        }
        "list" => {
            let a = Args::parse(rest, &[], &["json"])?;
            let uri = &a.exactly(1)?[0];
            list(uri, a.flag("json")).map_err(|e| labelled(uri, e))
        }
        "map" => {
            let a = Args::parse(rest, &["context"], &["json"])?;
            let context = a.value("context").unwrap_or("base:allocation");
            let uri = &a.exactly(1)?[0];
            map(uri, context, a.flag("json")).map_err(|e| labelled(uri, e))
        }
        "read" => {
            let a = Args::parse(rest, &[], &[])?;
            let p = a.exactly(3)?;
            let offset = parse_size(&p[1]).ok_or_else(|| usage("bad OFFSET"))?;
            let len = parse_size(&p[2]).ok_or_else(|| usage("bad LENGTH"))?;
            read(&p[0], offset, len).map_err(|e| labelled(&p[0], e))
        }
        "write" => {
            let a = Args::parse(rest, &[], &[])?;
            let p = a.exactly(2)?;
            let offset = parse_size(&p[1]).ok_or_else(|| usage("bad OFFSET"))?;
            write(&p[0], offset).map_err(|e| labelled(&p[0], e))
        }
        "copy" => {
            let a = Args::parse(
                rest,
                &["requests", "request-size", "connections"],
                &["progress"],
            )?;
            let p = a.exactly(2)?;
            let progress = a.flag("progress");
            let opts = CopyOptions {
                requests: a.number("requests", 64)?.clamp(1, 64) as usize,
                request_size: a.number("request-size", 256 << 10)?.clamp(512, 32 << 20) as usize,
                connections: a.number("connections", 1)?.clamp(1, 16) as usize,
                progress,
                src: format!("source {}", p[0]),
                dst: format!("destination {}", p[1]),
            };
            copy(&p[0], &p[1], &opts)
        }
        "-h" | "--help" | "help" => {
            let docs: Vec<&str> = include_str!("nbd-client.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| l.trim_start_matches("//!"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .filter(|l| !l.starts_with("```"))
                .collect();
            println!("{}\n\n{USAGE}", docs.join("\n"));
            Ok(())
        }
        other => Err(usage(&format!("unknown command {other:?}"))),
    }
}

// ---------------------------------------------------------------- JSON by hand

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------- info and list

fn parse_uri(uri: &str) -> io::Result<NbdUri> {
    NbdUri::parse(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Connects to `uri`, with TLS as the URI and `--tls-certificates` say.
fn connect(uri: &str, cfg: ClientConfig<'_>) -> io::Result<Nbd> {
    let connector = tls_connector(&parse_uri(uri)?)?;
    BlockingClient::connect_tls(uri, cfg, connector)
}

/// The TLS connector for `u`: none for plaintext (`nbd` without certificates). Every
/// setting that cannot work is refused here, before connecting.
fn tls_connector(u: &NbdUri) -> io::Result<Option<Arc<dyn TlsConnector>>> {
    let dir = u
        .tls_certificates
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| TLS_DIR.get().cloned().flatten());
    if !u.tls && dir.is_none() {
        return Ok(None);
    }
    let unsupported = |what: &str| io::Error::new(io::ErrorKind::Unsupported, what.to_owned());
    match u.tls_type.as_deref() {
        None | Some("x509") => {}
        Some(t) => {
            return Err(unsupported(&format!(
                "tls-type={t} is not supported: this client does TLS with X.509 certificates only"
            )))
        }
    }
    if u.unknown_params.iter().any(|(k, _)| k == "tls-psk-file") {
        return Err(unsupported(
            "tls-psk-file is not supported: this client does TLS with X.509 certificates only",
        ));
    }
    let verify = u.tls_verify_peer.unwrap_or(true);
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    if verify && dir.is_none() {
        return Err(invalid(
            "TLS needs the certificate authority that signed the server's certificate: add \
             tls-certificates=DIR to the URI or pass --tls-certificates DIR (DIR/ca-cert.pem)",
        ));
    }
    if verify && u.tls_hostname.is_none() && matches!(u.transport, Transport::Unix { .. }) {
        return Err(invalid(
            "TLS over a Unix socket needs tls-hostname=NAME in the URI, the name the \
             server's certificate must carry (or tls-verify-peer=false)",
        ));
    }
    let connector = tls::Connector::new(dir.as_deref(), verify).map_err(|e| invalid(&e))?;
    Ok(Some(Arc::new(connector)))
}

/// An error for an option the server refused, saying so plainly when it wants TLS.
fn refused(text: String) -> io::Error {
    if text.contains("NBD_REP_ERR_TLS_REQD") {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the server requires TLS ({text})"),
        )
    } else {
        io::Error::other(text)
    }
}

fn manual(uri: &str) -> io::Result<Nbd> {
    let mut cfg = ClientConfig::default();
    cfg.manual = true;
    connect(uri, cfg)
}

/// Manual mode up to (but not including) GO: extended headers or structured replies, and
/// the list of metadata contexts of `export` matching `queries` (all of them if empty).
fn probe(c: &mut Nbd, export: &str, queries: &[&str]) -> io::Result<Vec<String>> {
    if c.machine().state() != nbd_proto::client::State::Negotiating
        || c.machine().handshake_flags().bits() & 1 == 0
    {
        return Ok(Vec::new());
    }
    if c.opt(|m| m.opt_extended_headers())?.is_err() {
        let _ = c.opt(|m| m.opt_structured_reply())?;
    }
    if !c.machine().structured_replies() {
        return Ok(Vec::new());
    }
    Ok(match c.opt(|m| m.opt_list_meta_context(export, queries))? {
        Ok(()) => c.listed_contexts().iter().map(|(_, n)| n.clone()).collect(),
        Err(_) => Vec::new(),
    })
}

fn flag_names(f: TransmissionFlags) -> Vec<&'static str> {
    TransmissionFlags::NAMES
        .iter()
        .filter(|(_, v)| f.contains(*v) && *v != TransmissionFlags::HAS_FLAGS)
        .map(|(n, _)| *n)
        .collect()
}

fn info(uri: &str, queries: &[&str], json: bool) -> io::Result<()> {
    let parsed = parse_uri(uri)?;
    let mut c = manual(uri)?;
    let hs = c.machine().handshake_flags();
    let protocol = if c.machine().state() == nbd_proto::client::State::Ready {
        "oldstyle"
    } else if hs.contains(nbd_proto::wire::HandshakeFlags::FIXED_NEWSTYLE) {
        "newstyle-fixed"
    } else {
        "newstyle"
    };
    let contexts = probe(&mut c, &parsed.export, queries)?;
    if c.machine().state() != nbd_proto::client::State::Ready {
        let export = parsed.export.clone();
        let r = if c.machine().handshake_flags().bits() & 1 != 0 {
            c.opt(|m| m.opt_go(&export))?
        } else {
            c.opt(|m| m.opt_export_name(&export))?
        };
        r.map_err(refused)?;
    }
    let m = c.machine();
    let tls = m.tls_active();
    let d = c.details().clone();
    let size = c.size();
    let flags = c.flags();
    let b = m.advertised_block_size();
    let transaction = if m.extended_headers() {
        "extended headers"
    } else if m.structured_replies() {
        "structured replies"
    } else {
        "simple replies"
    };
    if json {
        let mut out = String::from("{\n");
        out.push_str(&format!("  \"protocol\": {},\n", json_str(protocol)));
        out.push_str(&format!("  \"TLS\": {tls},\n"));
        out.push_str(&format!("  \"transaction\": {},\n", json_str(transaction)));
        out.push_str(&format!(
            "  \"export-name\": {},\n",
            json_str(&parsed.export)
        ));
        if let Some(n) = &d.canonical_name {
            out.push_str(&format!("  \"canonical-name\": {},\n", json_str(n)));
        }
        if let Some(desc) = &d.description {
            out.push_str(&format!("  \"description\": {},\n", json_str(desc)));
        }
        out.push_str(&format!("  \"export-size\": {size},\n"));
        out.push_str(&format!("  \"flags\": {},\n", flags.bits()));
        for (n, _) in TransmissionFlags::NAMES.iter().skip(1) {
            let v = TransmissionFlags::NAMES
                .iter()
                .find(|(m, _)| m == n)
                .is_some_and(|(_, f)| flags.contains(*f));
            out.push_str(&format!("  {}: {v},\n", json_str(&n.to_ascii_lowercase())));
        }
        if let Some(b) = b {
            out.push_str(&format!(
                "  \"block_size_minimum\": {},\n  \"block_size_preferred\": {},\n  \"block_size_maximum\": {},\n",
                b.min, b.preferred, b.max_payload
            ));
        }
        let ctx: Vec<String> = contexts.iter().map(|c| json_str(c)).collect();
        out.push_str(&format!("  \"contexts\": [{}]\n}}", ctx.join(", ")));
        println!("{out}");
    } else {
        let with = if tls { "with" } else { "without" };
        println!("protocol: {protocol} {with} TLS, using {transaction}");
        println!("export={}:", json_str(&parsed.export));
        if let Some(n) = &d.canonical_name {
            println!("\tcanonical-name: {n}");
        }
        if let Some(desc) = &d.description {
            println!("\tdescription: {desc}");
        }
        println!("\texport-size: {size}");
        println!(
            "\tflags: {:#06x} ({})",
            flags.bits(),
            flag_names(flags).join(" ")
        );
        if let Some(b) = b {
            println!("\tblock_size_minimum: {}", b.min);
            println!("\tblock_size_preferred: {}", b.preferred);
            println!("\tblock_size_maximum: {}", b.max_payload);
        }
        if !contexts.is_empty() {
            println!("\tcontexts:");
            for ctx in &contexts {
                println!("\t\t{ctx}");
            }
        }
    }
    c.disconnect()
}

fn list(uri: &str, json: bool) -> io::Result<()> {
    let mut c = manual(uri)?;
    if c.machine().handshake_flags().bits() & 1 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the server cannot list exports (not fixed newstyle)",
        ));
    }
    c.opt(|m| m.opt_list())?.map_err(refused)?;
    let mut exports = c.exports().to_vec();
    for e in &mut exports {
        let name = e.name.clone();
        if c.opt(|m| m.opt_info(&name))?.is_ok() {
            let d = c.details();
            e.size = d.size;
            e.flags = d.flags;
            e.block_size = d.block_size;
            e.canonical_name = d.canonical_name.clone();
            if e.description.is_none() {
                e.description = d.description.clone();
            }
        }
    }
    let _ = c.opt(|m| m.opt_abort());
    if json {
        let items: Vec<String> = exports
            .iter()
            .map(|e| {
                let mut s = format!("  {{ \"export-name\": {}", json_str(&e.name));
                if let Some(d) = &e.description {
                    s.push_str(&format!(", \"description\": {}", json_str(d)));
                }
                if let Some(size) = e.size {
                    s.push_str(&format!(", \"export-size\": {size}"));
                }
                s.push_str(" }");
                s
            })
            .collect();
        println!("[\n{}\n]", items.join(",\n"));
    } else {
        for e in &exports {
            print!("{}", e.name);
            if let Some(d) = &e.description {
                print!("\t{d}");
            }
            if let Some(size) = e.size {
                print!("\t{size}");
            }
            println!();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- map

/// nbdinfo's words for a status value.
fn describe(context: &str, status: u64) -> String {
    if context == "base:allocation" {
        let mut parts = Vec::new();
        if status & extent::STATE_HOLE != 0 {
            parts.push("hole");
        }
        if status & extent::STATE_ZERO != 0 {
            parts.push("zero");
        }
        if parts.is_empty() {
            "data".into()
        } else {
            parts.join(",")
        }
    } else if context.starts_with("qemu:dirty-bitmap:") {
        if status & extent::STATE_DIRTY != 0 {
            "dirty"
        } else {
            "clean"
        }
        .into()
    } else if context == "qemu:allocation-depth" {
        match status {
            0 => "unallocated".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        }
    } else {
        String::new()
    }
}

/// The extents of `context` over the whole export, merged where neighbours agree.
fn extents_of(c: &mut Nbd, id: u32, start: u64, end: u64) -> io::Result<Vec<(u64, u64, u64)>> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut at = start;
    let max_len = if c.machine().extended_headers() {
        1 << 40
    } else {
        1 << 31
    };
    while at < end {
        let len = (end - at).min(max_len);
        let mut got = at;
        c.block_status(at, len, CmdFlags::empty(), |ctx, off, e: Extent| {
            if ctx != id || off >= end {
                return;
            }
            let len = e.len.min(end - off);
            got = off + len;
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off && last.2 == e.status => last.1 += len,
                _ => out.push((off, len, e.status)),
            }
        })?;
        if got <= at {
            return Err(io::Error::other(
                "the server made no progress in block status",
            ));
        }
        at = got;
    }
    Ok(out)
}

fn map(uri: &str, context: &str, json: bool) -> io::Result<()> {
    let mut cfg = ClientConfig::default();
    let queries = [context];
    cfg.meta_contexts = &queries;
    let mut c = connect(uri, cfg)?;
    let Some((id, _)) = c.contexts().into_iter().find(|(_, n)| *n == context) else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the server does not support metadata context {context:?}"),
        ));
    };
    let size = c.size();
    let extents = extents_of(&mut c, id, 0, size)?;
    c.disconnect()?;
    let mut out = String::new();
    if json {
        out.push_str("[\n");
        for (i, (off, len, status)) in extents.iter().enumerate() {
            out.push_str(&format!(
                "{{ \"offset\": {off}, \"length\": {len}, \"type\": {status}, \"description\": {} }}{}\n",
                json_str(&describe(context, *status)),
                if i + 1 < extents.len() { "," } else { "" }
            ));
        }
        out.push_str("]\n");
    } else {
        for (off, len, status) in &extents {
            out.push_str(&format!(
                "{off:>12} {len:>12} {status:>4} {}\n",
                describe(context, *status)
            ));
        }
    }
    io::stdout()
        .write_all(out.as_bytes())
        .map_err(StdoutClosed::mark)
}

// ---------------------------------------------------------------- read and write

fn read(uri: &str, offset: u64, len: u64) -> io::Result<()> {
    let mut c = connect(uri, ClientConfig::default())?;
    let step = 4 << 20;
    let mut buf = vec![0u8; step];
    let mut out = io::stdout().lock();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(step as u64) as usize;
        c.read_at(&mut buf[..n], offset + at)
            .map_err(|e| failed(format_args!("read of {n} bytes at {}", offset + at), e))?;
        out.write_all(&buf[..n]).map_err(StdoutClosed::mark)?;
        at += n as u64;
    }
    out.flush().map_err(StdoutClosed::mark)?;
    c.disconnect()
}

fn write(uri: &str, offset: u64) -> io::Result<()> {
    let mut c = connect(uri, ClientConfig::default())?;
    let mut buf = vec![0u8; 4 << 20];
    let mut stdin = io::stdin().lock();
    let mut at = offset;
    loop {
        let n = read_full(&mut stdin, &mut buf).map_err(|e| failed("standard input", e))?;
        if n == 0 {
            break;
        }
        c.write_at(&buf[..n], at, CmdFlags::empty())
            .map_err(|e| failed(format_args!("write of {n} bytes at {at}"), e))?;
        at += n as u64;
    }
    if c.flags().contains(TransmissionFlags::SEND_FLUSH) {
        c.flush().map_err(|e| failed("flush", e))?;
    }
    c.disconnect()
}

/// Reads until `buf` is full or end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------- copy

struct CopyOptions {
    requests: usize,
    request_size: usize,
    connections: usize,
    /// Show the progress on stderr.
    progress: bool,
    /// `source SRC`: what errors of the source start with.
    src: String,
    /// `destination DST`: what errors of the destination start with.
    dst: String,
}

fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://")
        || s.starts_with("nbds://")
        || s.starts_with("nbd+unix://")
        || s.starts_with("nbds+unix://")
}

enum Src {
    Nbd(Box<Nbd>),
    File(File),
    Stdin(io::Stdin),
}

enum Dst {
    Nbd(Box<Nbd>),
    /// A file or device; `true` for a regular file this copy truncated, which reads as zeroes
    /// wherever nothing is written.
    File(File, bool),
    /// Standard output as a plain file descriptor: `io::Stdout` is line-buffered and scans
    /// every buffer for newlines, which made copies of mostly-zero exports to stdout spend
    /// most of their time in `memrchr`.
    Stdout(File),
}

fn open_src(s: &str, allocation: bool) -> io::Result<Src> {
    if s == "-" {
        Ok(Src::Stdin(io::stdin()))
    } else if is_uri(s) {
        let mut cfg = ClientConfig::default();
        let q = ["base:allocation"];
        if allocation {
            cfg.meta_contexts = &q;
        }
        Ok(Src::Nbd(Box::new(connect(s, cfg)?)))
    } else {
        File::open(s).map(Src::File)
    }
}

/// Opens the destination. The `first` opening of a regular file truncates it, and sizes it
/// to `size` when that is known (otherwise [`worker`] sizes it to what was copied).
fn open_dst(s: &str, first: bool, size: Option<u64>) -> io::Result<Dst> {
    if s == "-" {
        use std::os::fd::AsFd;
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Dst::Stdout(File::from(fd)))
    } else if is_uri(s) {
        Ok(Dst::Nbd(Box::new(connect(s, ClientConfig::default())?)))
    } else {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(s)?;
        let fresh = first && f.metadata()?.is_file();
        if fresh {
            f.set_len(0)?;
            if let Some(size) = size {
                f.set_len(size)?;
            }
        }
        Ok(Dst::File(f, fresh))
    }
}

/// A run of the source: data to copy, or zeroes.
#[derive(Clone, Copy, Debug)]
struct Run {
    offset: u64,
    len: u64,
    zero: bool,
}

/// One request buffer of the copy pipeline.
struct Slot {
    buf: Vec<u8>,
    offset: u64,
    len: usize,
    cookie: Option<Cookie>,
    done: bool,
}

struct Slots<'a>(&'a mut VecDeque<Slot>);

impl Sink for Slots<'_> {
    fn read_buf(&mut self, cookie: Cookie, offset: u64, len: usize) -> &mut [u8] {
        match self.0.iter_mut().find(|s| s.cookie == Some(cookie)) {
            Some(s) => {
                let start = (offset - s.offset) as usize;
                s.buf.get_mut(start..start + len).unwrap_or(&mut [])
            }
            None => &mut [],
        }
    }
}

struct Progress {
    total: Option<u64>,
    done: AtomicU64,
    enabled: bool,
    /// stderr is a terminal: updates overwrite each other (`\r`), else one line each.
    in_place: bool,
    last: std::sync::Mutex<Instant>,
    printed: AtomicBool,
}

impl Progress {
    fn new(total: Option<u64>, enabled: bool) -> Self {
        Self {
            total,
            done: AtomicU64::new(0),
            enabled,
            in_place: io::stderr().is_terminal(),
            last: std::sync::Mutex::new(Instant::now()),
            printed: AtomicBool::new(false),
        }
    }

    fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !self.enabled {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_millis(500) {
            *last = Instant::now();
            self.print(done);
        }
    }

    fn print(&self, done: u64) {
        self.printed.store(true, Ordering::Relaxed);
        let text = match self.total {
            Some(t) if t > 0 => format!(
                "{:5.1}% ({done} / {t} bytes)",
                done as f64 * 100.0 / t as f64
            ),
            _ => format!("{done} bytes"),
        };
        if self.in_place {
            eprint!("\r{text}");
        } else {
            eprintln!("nbd-client: copy: {text}");
        }
    }

    /// The final count; `ok`: the copy succeeded (a failed copy's error line follows).
    fn finish(&self, ok: bool) {
        if !self.enabled {
            return;
        }
        if ok {
            self.print(self.done.load(Ordering::Relaxed));
        }
        if self.in_place && self.printed.load(Ordering::Relaxed) {
            eprintln!();
        }
    }
}

/// Why a copy between `s` and `d` cannot use several connections, if it cannot.
fn single_connection(s: &Src, d: &Dst, o: &CopyOptions) -> Option<String> {
    let (Src::Nbd(s), Dst::Nbd(d)) = (s, d) else {
        return Some("several connections need NBD servers at both ends".into());
    };
    let no_multi = |side: &str| format!("{side}: the server does not offer CAN_MULTI_CONN");
    if !s.flags().contains(TransmissionFlags::CAN_MULTI_CONN) {
        Some(no_multi(&o.src))
    } else if !d.flags().contains(TransmissionFlags::CAN_MULTI_CONN) {
        Some(no_multi(&o.dst))
    } else if s.size() == 0 {
        Some("the source is empty".into())
    } else {
        None
    }
}

fn copy(src: &str, dst: &str, o: &CopyOptions) -> io::Result<()> {
    let first_src = open_src(src, true).map_err(|e| labelled(&o.src, e))?;
    let size = match &first_src {
        Src::Nbd(c) => Some(c.size()),
        Src::File(f) => {
            let m = f.metadata().map_err(|e| labelled(&o.src, e))?;
            m.is_file().then_some(m.len())
        }
        Src::Stdin(_) => None,
    };
    let first_dst = open_dst(dst, true, size).map_err(|e| labelled(&o.dst, e))?;
    if let (Some(size), Dst::Nbd(d)) = (size, &first_dst) {
        if d.size() < size {
            return Err(labelled(
                &o.dst,
                io::Error::other(format!(
                    "{} bytes, smaller than the source ({size} bytes)",
                    d.size()
                )),
            ));
        }
    }
    let progress = Progress::new(size, o.progress);
    // Several connections only between NBD endpoints whose servers allow it, and at least
    // 1 MiB each.
    let mut connections = 1;
    if o.connections > 1 {
        match single_connection(&first_src, &first_dst, o) {
            Some(why) => eprintln!(
                "nbd-client: copy: using 1 connection instead of {}: {why}",
                o.connections
            ),
            None => connections = o.connections,
        }
    }
    let size_or_0 = size.unwrap_or(0);
    let part = size_or_0.div_ceil(connections as u64).div_ceil(1 << 20) * (1 << 20);
    if connections > 1 {
        let needed = size_or_0.div_ceil(part) as usize;
        if needed < connections {
            eprintln!(
                "nbd-client: copy: using {needed} connection(s) instead of {connections}: the source has only {size_or_0} bytes (1 MiB per connection at least)"
            );
            connections = needed;
        }
    }
    let result = if connections == 1 {
        worker(first_src, first_dst, 0, size, o, &progress)
    } else {
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut firsts = Some((first_src, first_dst));
            for i in 0..connections as u64 {
                let start = (i * part).min(size_or_0);
                let end = ((i + 1) * part).min(size_or_0);
                let progress = &progress;
                let ends = firsts.take();
                handles.push(scope.spawn(move || -> io::Result<()> {
                    let (s, d) = match ends {
                        Some(e) => e,
                        None => (
                            open_src(src, true).map_err(|e| labelled(&o.src, e))?,
                            open_dst(dst, false, None).map_err(|e| labelled(&o.dst, e))?,
                        ),
                    };
                    worker(s, d, start, Some(end), o, progress)
                }));
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("worker panicked")))
                })
                .collect::<io::Result<Vec<()>>>()
                .map(|_| ())
        })
    };
    progress.finish(result.is_ok());
    result
}

/// Copies `[start, end)` (`end` = None: until the source ends) from `src` to `dst`. Every
/// error names the side it came from.
fn worker(
    mut src: Src,
    mut dst: Dst,
    start: u64,
    end: Option<u64>,
    o: &CopyOptions,
    progress: &Progress,
) -> io::Result<()> {
    let on_src = |e| labelled(&o.src, e);
    let on_dst = |e| labelled(&o.dst, e);
    let Some(end) = end else {
        // A stream of unknown length: one block at a time, in order.
        let mut buf = vec![0u8; o.request_size];
        let mut at = start;
        loop {
            let n = match &mut src {
                Src::Stdin(s) => read_full(&mut s.lock(), &mut buf),
                Src::File(f) => read_full(f, &mut buf),
                Src::Nbd(_) => unreachable!("NBD sources have a size"),
            }
            .map_err(on_src)?;
            if n == 0 {
                break;
            }
            put(&mut dst, at, &buf[..n], o).map_err(on_dst)?;
            progress.add(n as u64);
            at += n as u64;
        }
        // Zero blocks were left out of a fresh file: its size is what was copied.
        if let Dst::File(f, true) = &dst {
            f.set_len(at).map_err(on_dst)?;
        }
        return finish(dst).map_err(on_dst);
    };
    // Where the zeroes are, if the source can say.
    let context = match &src {
        Src::Nbd(c) => c.contexts().first().map(|(id, _)| *id),
        _ => None,
    };
    let runs: Vec<Run> = match (&mut src, context) {
        (Src::Nbd(c), Some(id)) => extents_of(c, id, start, end)
            .map_err(on_src)?
            .into_iter()
            .map(|(offset, len, status)| Run {
                offset,
                len,
                zero: status & extent::STATE_ZERO != 0,
            })
            .collect(),
        _ => vec![Run {
            offset: start,
            len: end - start,
            zero: false,
        }],
    };
    let mut slots: VecDeque<Slot> = VecDeque::new();
    let mut free: Vec<Vec<u8>> = Vec::new();
    let mut pieces: VecDeque<(u64, usize)> = VecDeque::new();
    for run in runs {
        if run.zero {
            // Reads still in flight first: the destination sees everything in order.
            pump(
                &mut src,
                &mut dst,
                &mut pieces,
                &mut slots,
                &mut free,
                o,
                progress,
            )?;
            write_zeroes(&mut dst, run.offset, run.len).map_err(on_dst)?;
            progress.add(run.len);
            continue;
        }
        let mut at = run.offset;
        while at < run.offset + run.len {
            let n = (run.offset + run.len - at).min(o.request_size as u64) as usize;
            pieces.push_back((at, n));
            at += n as u64;
        }
    }
    pump(
        &mut src,
        &mut dst,
        &mut pieces,
        &mut slots,
        &mut free,
        o,
        progress,
    )?;
    finish(dst).map_err(on_dst)?;
    if let Src::Nbd(c) = src {
        c.disconnect().map_err(on_src)?;
    }
    Ok(())
}

/// Moves every queued piece from `src` to `dst`, keeping up to `o.requests` reads in
/// flight and writing completions out in order. Errors name their side.
fn pump(
    src: &mut Src,
    dst: &mut Dst,
    pieces: &mut VecDeque<(u64, usize)>,
    slots: &mut VecDeque<Slot>,
    free: &mut Vec<Vec<u8>>,
    o: &CopyOptions,
    progress: &Progress,
) -> io::Result<()> {
    let on_src = |e| labelled(&o.src, e);
    loop {
        // Fill the pipeline.
        while slots.len() < o.requests {
            let Some((offset, len)) = pieces.pop_front() else {
                break;
            };
            let mut buf = free.pop().unwrap_or_else(|| vec![0u8; o.request_size]);
            let cookie = match src {
                Src::Nbd(c) => Some(
                    c.submit_read(offset, len as u32, CmdFlags::empty())
                        .map_err(on_src)?,
                ),
                Src::File(f) => {
                    f.read_exact_at(&mut buf[..len], offset).map_err(on_src)?;
                    None
                }
                Src::Stdin(_) => unreachable!("streams do not use the pipeline"),
            };
            slots.push_back(Slot {
                buf,
                offset,
                len,
                done: cookie.is_none(),
                cookie,
            });
        }
        if slots.is_empty() {
            return Ok(());
        }
        // Write out what is complete at the head, in order.
        while slots.front().is_some_and(|s| s.done) {
            let s = slots.pop_front().expect("front exists");
            put(dst, s.offset, &s.buf[..s.len], o).map_err(|e| labelled(&o.dst, e))?;
            progress.add(s.len as u64);
            free.push(s.buf);
        }
        if slots.is_empty() {
            continue;
        }
        if let Src::Nbd(c) = src {
            let done = c.complete(&mut Slots(slots)).map_err(on_src)?;
            let slot = slots.iter_mut().find(|s| s.cookie == Some(done.cookie));
            if let Err(e) = done.result {
                let what = match &slot {
                    Some(s) => format!("read of {} bytes at {}", s.len, s.offset),
                    None => "read".into(),
                };
                return Err(on_src(failed(what, e.into())));
            }
            if let Some(s) = slot {
                s.done = true;
            }
        }
    }
}

/// Waits for one write of the destination and checks its result.
fn complete_write(c: &mut Nbd) -> io::Result<()> {
    let done = c.complete(&mut NoSink)?;
    done.result.map_err(|e| failed("write", e.into()))
}

/// Writes one block of data to the destination (zero blocks as zeroes where cheaper).
fn put(dst: &mut Dst, offset: u64, data: &[u8], o: &CopyOptions) -> io::Result<()> {
    let zero = data.iter().all(|b| *b == 0);
    match dst {
        Dst::Nbd(c) => {
            if c.in_flight() >= o.requests {
                complete_write(c)?;
            }
            if zero && c.flags().contains(TransmissionFlags::SEND_WRITE_ZEROES) {
                c.submit_write_zeroes(offset, data.len() as u64, CmdFlags::empty())?;
            } else {
                c.submit_write(offset, data, CmdFlags::empty())?;
            }
            Ok(())
        }
        // A fresh file reads as zeroes already.
        Dst::File(_, true) if zero => Ok(()),
        Dst::File(f, _) => f.write_all_at(data, offset),
        Dst::Stdout(s) => s.write_all(data).map_err(StdoutClosed::mark),
    }
}

/// Makes `[offset, offset + len)` of the destination read as zeroes: nothing to do in a
/// fresh file, `NBD_CMD_WRITE_ZEROES` where the server has it, zero blocks elsewhere.
fn write_zeroes(dst: &mut Dst, offset: u64, len: u64) -> io::Result<()> {
    match dst {
        Dst::Nbd(c) if c.flags().contains(TransmissionFlags::SEND_WRITE_ZEROES) => {
            // Keep the synchronous call's precondition.
            while c.in_flight() > 0 {
                complete_write(c)?;
            }
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(1 << 30);
                c.write_zeroes(at, n, CmdFlags::empty())
                    .map_err(|e| failed(format_args!("write zeroes of {n} bytes at {at}"), e))?;
                at += n;
            }
            Ok(())
        }
        Dst::File(_, true) => Ok(()),
        _ => {
            let zeroes = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(1 << 20) as usize;
                match dst {
                    Dst::Nbd(c) => {
                        while c.in_flight() > 0 {
                            complete_write(c)?;
                        }
                        c.write_at(&zeroes[..n], at, CmdFlags::empty())
                            .map_err(|e| failed(format_args!("write of {n} bytes at {at}"), e))?
                    }
                    Dst::File(f, _) => f.write_all_at(&zeroes[..n], at)?,
                    Dst::Stdout(s) => s.write_all(&zeroes[..n]).map_err(StdoutClosed::mark)?,
                }
                at += n as u64;
            }
            Ok(())
        }
    }
}

/// Waits for the destination's writes and makes them durable.
fn finish(dst: Dst) -> io::Result<()> {
    match dst {
        Dst::Nbd(mut c) => {
            while c.in_flight() > 0 {
                complete_write(&mut c)?;
            }
            if c.flags().contains(TransmissionFlags::SEND_FLUSH) {
                c.flush().map_err(|e| failed("flush", e))?;
            }
            c.disconnect()
        }
        Dst::File(f, _) => f.sync_data(),
        Dst::Stdout(mut s) => s.flush().map_err(StdoutClosed::mark),
    }
}

/// TLS with rustls (ring): the example's side of the [`TlsConnector`] hand-off.
mod tls {
    use std::io::{self, Read, Write};
    use std::path::Path;
    use std::sync::Arc;

    use nbd_proto::blocking::client::Stream;
    use nbd_proto::blocking::TlsConnector;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{
        ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
        StreamOwned,
    };

    pub struct Connector {
        config: Arc<ClientConfig>,
        verify: bool,
    }

    impl Connector {
        /// Trusts `DIR/ca-cert.pem` (unless `verify` is off) and presents
        /// `DIR/client-cert.pem` with `DIR/client-key.pem` if both exist.
        pub fn new(dir: Option<&Path>, verify: bool) -> Result<Self, String> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS configuration: {e}"))?;
            let builder = if verify {
                let dir = dir.ok_or("TLS needs a certificate directory")?;
                let ca = dir.join("ca-cert.pem");
                let mut roots = RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
                    .and_then(|i| i.collect())
                    .map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificate", ca.display()));
                }
                builder.with_root_certificates(roots)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            };
            let client_cert = dir.map(|d| (d.join("client-cert.pem"), d.join("client-key.pem")));
            let config = match client_cert {
                Some((cert, key)) if cert.exists() && key.exists() => {
                    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                        .and_then(|i| i.collect())
                        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
                    let key = PrivateKeyDer::from_pem_file(&key)
                        .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
                    builder
                        .with_client_auth_cert(certs, key)
                        .map_err(|e| format!("{}: {e}", cert.display()))?
                }
                _ => builder.with_no_client_auth(),
            };
            Ok(Self {
                config: Arc::new(config),
                verify,
            })
        }
    }

    impl TlsConnector for Connector {
        fn connect(
            &self,
            mut stream: Box<dyn Stream>,
            server_name: Option<&str>,
        ) -> io::Result<Box<dyn Stream>> {
            let name = match (server_name, self.verify) {
                (Some(n), _) => n,
                // Nothing is checked: any name will do for the handshake.
                (None, false) => "localhost",
                (None, true) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "no server name to check the certificate against (tls-hostname=)",
                    ))
                }
            };
            let name = ServerName::try_from(name.to_owned()).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {e}"))
            })?;
            let mut conn =
                ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
            while conn.is_handshaking() {
                conn.complete_io(&mut stream)?;
            }
            Ok(Box::new(Session(StreamOwned::new(conn, stream))))
        }
    }

    /// A TLS session that says goodbye (`close_notify`) when dropped.
    struct Session(StreamOwned<ClientConnection, Box<dyn Stream>>);

    impl Read for Session {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Session {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    impl Drop for Session {
        fn drop(&mut self) {
            self.0.conn.send_close_notify();
            // Best effort, and never a read: the server may be gone already.
            while self.0.conn.wants_write() {
                match self.0.conn.write_tls(&mut self.0.sock) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
    }

    /// `tls-verify-peer=false`: any certificate is accepted, but the handshake signatures
    /// are still checked (the session is encrypted, just not authenticated).
    #[derive(Debug)]
    struct NoVerification(Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
