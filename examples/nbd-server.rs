//! An NBD server on an in-memory disk or a file, built on `nbd_proto::blocking::server`.
//!
//! ```text
//! cargo run --release --example nbd-server                 # 1 GiB sparse memory disk, 127.0.0.1:10809
//! qemu-img info nbd://127.0.0.1:10809                      # or: nbdinfo nbd://127.0.0.1:10809
//! ```
//!
//! Options (export options apply to the export named by the last `--export`, or to the
//! default export `""` before any `--export`):
//!
//! ```text
//! --listen ADDR:PORT        listen on TCP (default 127.0.0.1:10809 unless --unix is given)
//! --unix PATH               listen on a Unix socket
//! --pid-file PATH           write the process ID here once listening
//! --oldstyle                oldstyle negotiation (serves the first export)
//! --no-structured-replies   refuse NBD_OPT_STRUCTURED_REPLY (and extended headers)
//! --no-extended-headers     refuse NBD_OPT_EXTENDED_HEADERS
//! --export NAME             start another export
//! --memory SIZE             sparse memory disk (K, M, G, T suffixes; default 1G)
//! --file PATH               a file or block device
//! --read-only               refuse writes
//! --description TEXT        description sent to clients
//! --block-size MIN:PREF:MAX advertise (and enforce) block-size constraints
//! --dirty-bitmap NAME       serve qemu:dirty-bitmap:NAME: blocks written since start
//! --granularity SIZE        dirty bitmap granularity (default 64K)
//! --tls-cert PATH           PEM certificate chain: enables TLS (NBD_OPT_STARTTLS)
//! --tls-key PATH            PEM private key for --tls-cert
//! --tls required|optional   TLS policy when a certificate is given (default required)
//! --tls-only                (per export) only offer this export over TLS (with --tls optional)
//! --spin-us N               poll a connection for N µs before blocking on it (default 50;
//!                           0 blocks at once): lower latency for one request at a time
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::exit;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nbd_proto::blocking::server::{serve, Backend, DirtyBitmap, Export, MemoryBackend, Options};
use nbd_proto::server::ServerConfig;
use nbd_proto::wire::extent::{STATE_HOLE, STATE_ZERO};
use nbd_proto::wire::{BlockSize, Extent, TransmissionFlags};
use nbd_proto::TlsPolicy;

struct ExportSpec {
    name: String,
    memory: Option<u64>,
    file: Option<PathBuf>,
    read_only: bool,
    description: Option<String>,
    block_size: Option<BlockSize>,
    dirty_bitmap: Option<String>,
    granularity: u64,
    tls_only: bool,
}

impl ExportSpec {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            memory: None,
            file: None,
            read_only: false,
            description: None,
            block_size: None,
            dirty_bitmap: None,
            granularity: 64 << 10,
            tls_only: false,
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nbd-server: {e}");
        exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut listen: Option<String> = None;
    let mut unix: Option<PathBuf> = None;
    let mut pid_file: Option<PathBuf> = None;
    let mut config = ServerConfig::default();
    let mut oldstyle = false;
    let mut tls_cert: Option<PathBuf> = None;
    let mut tls_key: Option<PathBuf> = None;
    let mut tls_policy = TlsPolicy::Required;
    let mut spin = Duration::from_micros(50);
    let mut specs = vec![ExportSpec::new("")];
    let mut explicit = false;
    // Whether an export option was given before the first --export.
    let mut default_configured = false;
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
        let spec = specs.last_mut().expect("at least one export");
        const EXPORT_OPTIONS: [&str; 8] = [
            "--memory",
            "--file",
            "--read-only",
            "--description",
            "--block-size",
            "--dirty-bitmap",
            "--granularity",
            "--tls-only",
        ];
        if !explicit && EXPORT_OPTIONS.contains(&arg.as_str()) {
            default_configured = true;
        }
        match arg.as_str() {
            "--listen" => listen = Some(value("ADDR:PORT")?),
            "--unix" => unix = Some(value("PATH")?.into()),
            "--pid-file" => pid_file = Some(value("PATH")?.into()),
            "--oldstyle" => oldstyle = true,
            "--no-structured-replies" => config.structured_replies = false,
            "--no-extended-headers" => config.extended_headers = false,
            "--export" => {
                let name = value("NAME")?;
                // Options before the first --export configure the default export "";
                // without any, there is no default export, only the named ones.
                if explicit || default_configured {
                    specs.push(ExportSpec::new(&name));
                } else {
                    spec.name = name;
                }
                explicit = true;
            }
            "--memory" => spec.memory = Some(parse_size(&value("SIZE")?)?),
            "--file" => spec.file = Some(value("PATH")?.into()),
            "--read-only" => spec.read_only = true,
            "--description" => spec.description = Some(value("TEXT")?),
            "--block-size" => spec.block_size = Some(parse_block_size(&value("MIN:PREF:MAX")?)?),
            "--dirty-bitmap" => spec.dirty_bitmap = Some(value("NAME")?),
            "--granularity" => spec.granularity = parse_size(&value("SIZE")?)?,
            "--tls-cert" => tls_cert = Some(value("PATH")?.into()),
            "--tls-key" => tls_key = Some(value("PATH")?.into()),
            "--tls" => {
                tls_policy = match value("required|optional")?.as_str() {
                    "required" => TlsPolicy::Required,
                    "optional" => TlsPolicy::Optional,
                    other => {
                        return Err(format!("--tls wants required or optional, not {other:?}"))
                    }
                }
            }
            "--tls-only" => spec.tls_only = true,
            "--spin-us" => {
                let us = value("MICROSECONDS")?;
                spin =
                    Duration::from_micros(us.parse().map_err(|_| format!("bad --spin-us {us:?}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("nbd-server.rs")
                        .lines()
                        .take_while(|l| l.starts_with("//!"))
                        .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }

    let mut exports = Vec::new();
    for spec in &specs {
        exports.push(build_export(spec)?);
    }
    let mut options = Options::new(exports);
    options.config = config;
    options.oldstyle = oldstyle;
    match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            options.tls = Some(Arc::new(tls::Acceptor::new(&cert, &key)?));
            options.config.tls = tls_policy;
        }
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together".into()),
    }
    let options = Arc::new(options);

    let summary: Vec<String> = options
        .exports
        .iter()
        .map(|e| {
            format!(
                "{:?} ({} bytes{})",
                e.name,
                e.backend.size(),
                if e.read_only { ", read-only" } else { "" }
            )
        })
        .collect();
    if let Some(path) = unix {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        on_signal_cleanup(vec![path.clone()], pid_file.clone());
        write_pid(&pid_file)?;
        let uri = format!("nbd+unix:///?socket={}", path.display());
        println!(
            "serving {} on {}; try: nbdinfo '{uri}'",
            summary.join(", "),
            path.display()
        );
        for stream in listener.incoming() {
            let stream = stream.map_err(|e| e.to_string())?;
            spawn(stream, &options, spin);
        }
    } else {
        let addr = listen.unwrap_or_else(|| "127.0.0.1:10809".into());
        let listener =
            TcpListener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        on_signal_cleanup(Vec::new(), pid_file.clone());
        write_pid(&pid_file)?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!(
            "serving {} on {local}; try: qemu-img info nbd://{local} or nbdinfo nbd://{local}",
            summary.join(", ")
        );
        for stream in listener.incoming() {
            let stream = stream.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            spawn(stream, &options, spin);
        }
    }
    Ok(())
}

fn spawn<S>(stream: S, options: &Arc<Options>, spin: Duration)
where
    S: nbd_proto::blocking::server::Stream + AsFd + 'static,
{
    let options = options.clone();
    thread::spawn(move || {
        if let Err(e) = serve(
            Spinning {
                inner: stream,
                spin,
            },
            &options,
        ) {
            eprintln!("nbd-server: connection ended: {e}");
        }
    });
}

/// A socket whose reads first poll briefly without blocking before they block.
///
/// The server reads as soon as it has replied. A client at queue depth 1 sends its next
/// request a few microseconds later: blocking at once puts the thread, and on a virtual
/// machine the vCPU, to sleep, and waking it costs tens of microseconds per request.
/// Polling for `spin` first (default 50 µs, `--spin-us`) keeps it awake for the requests
/// that come quickly and costs only that much CPU when none comes.
struct Spinning<S> {
    inner: S,
    spin: Duration,
}

impl<S: io::Read + AsFd> io::Read for Spinning<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.spin.is_zero() && !buf.is_empty() {
            let start = Instant::now();
            loop {
                match rustix::net::recv(&self.inner, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
                    Ok((n, _)) => return Ok(n),
                    Err(rustix::io::Errno::AGAIN) if start.elapsed() < self.spin => {
                        std::hint::spin_loop()
                    }
                    Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.inner.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        // Payload reads follow their header at once: no spin needed.
        self.inner.read_vectored(bufs)
    }
}

impl<S: io::Write> io::Write for Spinning<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.inner.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn build_export(spec: &ExportSpec) -> Result<Export, String> {
    let mut backend: Arc<dyn Backend> = match (&spec.file, spec.memory) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "export {:?}: --file and --memory both given",
                spec.name
            ))
        }
        (Some(path), None) => Arc::new(FileBackend::open(path, spec.read_only)?),
        (None, size) => Arc::new(MemoryBackend::new(size.unwrap_or(1 << 30))),
    };
    if let Some(name) = &spec.dirty_bitmap {
        backend = Arc::new(DirtyBitmap::new(backend, name, spec.granularity));
    }
    let mut export = Export::new(&spec.name, backend);
    export.read_only = spec.read_only;
    export.block_size = spec.block_size;
    export.description = spec.description.clone();
    export.tls_only = spec.tls_only;
    Ok(export)
}

fn write_pid(path: &Option<PathBuf>) -> Result<(), String> {
    if let Some(p) = path {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

/// On SIGINT or SIGTERM: remove the socket and pid file, then exit.
fn on_signal_cleanup(files: Vec<PathBuf>, pid_file: Option<PathBuf>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-server: cannot handle signals: {e}");
            return;
        }
    };
    thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            for f in files.iter().chain(pid_file.iter()) {
                let _ = std::fs::remove_file(f);
            }
            eprintln!("nbd-server: signal {sig}, shutting down");
            exit(0);
        }
    });
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let parts: Vec<_> = s.split(':').map(parse_size).collect::<Result<_, _>>()?;
    let [min, preferred, max_payload] = parts[..] else {
        return Err(format!("--block-size wants MIN:PREF:MAX, got {s:?}"));
    };
    let small = |v: u64| u32::try_from(v).map_err(|_| format!("block size {v} too large"));
    let b = BlockSize {
        min: small(min)?,
        preferred: small(preferred)?,
        max_payload: small(max_payload)?,
    };
    b.validate().map_err(|e| format!("--block-size {s}: {e}"))?;
    Ok(b)
}

/// A file or block device: `base:allocation` from SEEK_DATA/SEEK_HOLE, trim and zeroing
/// punch holes, flush and FUA sync.
struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    fn open(path: &PathBuf, read_only: bool) -> Result<Self, String> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn flags(&self) -> TransmissionFlags {
        let mut f = TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            // Zeroing punches a hole: fast, unless NO_HOLE asks for allocation (then the
            // request fails with NBD_ENOTSUP, as FAST_ZERO allows).
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::SEND_CACHE
            | TransmissionFlags::SEND_DF
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD
            // One file through the kernel's page cache: a flush covers every connection.
            | TransmissionFlags::CAN_MULTI_CONN;
        if self.read_only {
            f |= TransmissionFlags::READ_ONLY;
        }
        f
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // Advisory: a file system that cannot punch holes just keeps the data.
        let _ = self.punch(offset, len);
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> io::Result<()> {
        if no_hole || self.punch(offset, len).is_err() {
            if fast {
                return Err(io::ErrorKind::Unsupported.into());
            }
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zeroes.len() as u64);
                self.file.write_all_at(&zeroes[..n as usize], offset + at)?;
                at += n;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec!["base:allocation".into()]
    }
    fn extents(
        &self,
        _context: usize,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        use rustix::fs::{seek, SeekFrom as Whence};
        let end = offset.saturating_add(len).min(self.size);
        let first = out.len();
        let mut at = offset;
        // Data and holes alternate, so each extent is one seek: the work is bounded by
        // `max`, not by the range.
        while at < end && out.len() - first < max {
            // The next data at or after `at`; ENXIO means only a hole remains.
            let data = match seek(&self.file, Whence::Data(at)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => self.size,
                Err(_) => {
                    // No SEEK_DATA support: everything is data.
                    out.push(Extent {
                        len: end - at,
                        status: 0,
                    });
                    return Ok(());
                }
            };
            if data > at {
                let n = data.min(end) - at;
                out.push(Extent {
                    len: n,
                    status: STATE_HOLE | STATE_ZERO,
                });
                at += n;
                continue;
            }
            let hole = seek(&self.file, Whence::Hole(at)).unwrap_or(self.size);
            let n = hole.min(end) - at;
            out.push(Extent {
                len: n.max(1),
                status: 0,
            });
            at += n.max(1);
        }
        Ok(())
    }
}

/// TLS with rustls: the example's side of the [`nbd_proto::blocking::server::TlsAcceptor`]
/// hand-off.
mod tls {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    use nbd_proto::blocking::server::{Stream, TlsAcceptor};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ServerConfig, ServerConnection, StreamOwned};

    pub struct Acceptor(Arc<ServerConfig>);

    impl Acceptor {
        pub fn new(cert: &Path, key: &Path) -> Result<Self, String> {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
                .map_err(|e| format!("TLS configuration: {e}"))?;
            Ok(Self(Arc::new(config)))
        }
    }

    impl TlsAcceptor for Acceptor {
        fn accept(&self, mut stream: Box<dyn Stream>) -> io::Result<Box<dyn Stream>> {
            let mut conn = ServerConnection::new(self.0.clone()).map_err(io::Error::other)?;
            while conn.is_handshaking() {
                conn.complete_io(&mut stream)?;
            }
            Ok(Box::new(StreamOwned::new(conn, stream)))
        }
    }
}
