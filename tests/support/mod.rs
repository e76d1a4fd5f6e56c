//! Test harness for interop tests against real NBD peers.
//!
//! Include it from an integration test with `mod support;`. It only uses
//! `std`, Linux `/proc` and the `kill` command. It starts and
//! stops `qemu-nbd`, `nbdkit` and `nbd-server`, runs client tools with a
//! timeout, and makes temporary directories and data files.
//!
//! * **Skip policy:** start each test with
//!   `if !support::require(&["nbdkit", "nbdinfo"]) { return; }`.
//!   If a tool is missing, the test prints `SKIP <test>: <tool> not installed`
//!   and passes. With `NBD_INTEROP=required` (as CI sets it) it panics instead.
//! * **Isolation:** every server gets a fresh temporary directory. That
//!   directory holds its Unix socket, pid file, log and config. TCP servers
//!   listen on 127.0.0.1 only, on a port no other test in this process has
//!   been given. This makes it safe for cargo to run tests in parallel threads.
//! * **Cleanup:** `Drop` sends SIGTERM to exactly the pid the server wrote to
//!   its pid file, and sends SIGKILL after [`STOP_TIMEOUT`]. Nothing is ever
//!   killed by name. If a test panics, the server's log is printed.
//! * **Debugging:** `NBD_TEST_KEEP=1` keeps the temporary directories.
//!
//! Quirks of the peers on Debian 12 (qemu 10, nbdkit 1.32, nbd-server 3.24,
//! libnbd 1.14) that this code deals with:
//! * All three servers daemonise. The daemon is re-parented to PID 1 and can
//!   linger as a zombie for a while, so a process in state `Z` counts as gone.
//! * `nbd-server` has no default export. Its export is called `disk`, and
//!   [`Peer::default_uri`] uses that name.
//! * `nbdsh` must run with `/usr/bin` first in `PATH`: a pyenv `python3`
//!   without the `nbd` module may shadow the system one. [`nbdsh`] and [`run`]
//!   set this up.
//! * `nbdkit` 1.32 does not exit on SIGTERM while a client is still
//!   connected, so `Drop` only stops it with SIGKILL after [`STOP_TIMEOUT`].
//!   Close clients first. Locals drop in reverse order, so declare the
//!   server before the client.
//! * `nbdkit` 1.32 can abort when a client that negotiated structured
//!   replies hangs up with read replies still pending. Tests that disconnect
//!   abruptly should use their own fresh `nbdkit`.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to start listening before the test panics.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process gets to exit after SIGTERM before it is sent SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time limit for a client command run by [`run`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The export name `nbd-server` is configured with (it has no default export).
pub const NBD_SERVER_EXPORT: &str = "disk";

/// Global counter that makes temp dir and scratch file names unique in this process.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn next_id() -> usize {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Skip policy

/// Returns true when `NBD_INTEROP=required`. In that mode a missing peer is
/// a test failure, not a skip.
pub fn interop_required() -> bool {
    std::env::var("NBD_INTEROP").is_ok_and(|v| v == "required")
}

/// The name of the running test, taken from the test thread's name.
/// Falls back to `"test"` when tests run on the main thread.
pub fn test_name() -> String {
    match thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => "test".to_string(),
    }
}

/// Finds an executable `tool` on `PATH` (or checks it, if it contains a `/`).
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let is_exe = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return is_exe(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_exe(p))
}

/// Returns true if the libnbd Python bindings can be imported, which `nbdsh`
/// needs. It tries `/usr/bin/python3` first, then `python3`. The result is
/// cached for the process.
pub fn python_nbd_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        ["/usr/bin/python3", "python3"].iter().any(|py| {
            Command::new(py)
                .args(["-c", "import nbd"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// Returns the entries of `tools` that are not usable, with a reason each
/// (e.g. `"nbdkit not installed"`). It never panics or prints.
pub fn missing_tools(tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    for &tool in tools {
        if find_in_path(tool).is_none() {
            missing.push(format!("{tool} not installed"));
        } else if tool == "nbdsh" && !python_nbd_available() {
            missing.push(
                "nbdsh not installed (python3 module `nbd` missing; install python3-libnbd)"
                    .to_string(),
            );
        }
    }
    missing
}

/// Checks that every tool in `tools` is installed. For `nbdsh` it also checks
/// the Python `nbd` module.
///
/// Returns `true` if the test can go on. If something is missing:
/// * with `NBD_INTEROP=required`, it panics and names the missing tools;
/// * otherwise it prints `SKIP <test>: <tool> not installed` to stderr and
///   returns `false`, and the test should `return` (it then passes). The
///   line bypasses the test harness's output capture, so it always shows.
///
/// Use it as `if !support::require(&["qemu-nbd", "nbdinfo"]) { return; }`.
pub fn require(tools: &[&str]) -> bool {
    let missing = missing_tools(tools);
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{}: {}", test_name(), missing.join(", "));
    if interop_required() {
        panic!("NBD_INTEROP=required but a peer is missing: {msg}");
    }
    // Written to the stderr handle directly: `eprintln!` would be captured
    // by the test harness and only shown for failing tests.
    let _ = writeln!(io::stderr(), "SKIP {msg}");
    false
}

/// `require_peers!("nbdkit", "nbdinfo");` is the same as
/// `if !support::require(&["nbdkit", "nbdinfo"]) { return; }`.
#[allow(unused_macros)]
macro_rules! require_peers {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::support::require(&[$($tool),+]) {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_peers;

// ---------------------------------------------------------------------------
// Temporary directories and data files

/// Keeps only `[A-Za-z0-9_-]` and at most the last 40 characters, so the
/// result is safe in paths and keeps socket paths short.
fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_');
    let start = s.len().saturating_sub(40);
    let s = &s[start..];
    if s.is_empty() {
        "test".to_string()
    } else {
        s.to_string()
    }
}

/// Creates a new directory `BASE/nbdp-PID-N-LABEL`. It picks another N if
/// that name already exists, e.g. left over from an earlier crashed run.
fn create_unique_dir(base: &Path, label: &str) -> io::Result<PathBuf> {
    let pid = std::process::id();
    for _ in 0..1000 {
        let p = base.join(format!("nbdp-{pid}-{}-{label}", next_id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("could not create a unique temp dir"))
}

/// A fresh per-test temporary directory, removed on drop (unless
/// `NBD_TEST_KEEP=1`).
///
/// * [`TestDir::path`] is under [`std::env::temp_dir`]. It is meant for
///   sockets, pid files, configs and logs.
/// * [`TestDir::data_dir`] is under `/dev/shm` when that exists (fast,
///   RAM-backed). It is meant for disk images. Otherwise it is the same as
///   `path()`.
pub struct TestDir {
    path: PathBuf,
    data: PathBuf,
}

impl TestDir {
    /// A new directory whose name contains the current test's name.
    pub fn new() -> TestDir {
        TestDir::named(&test_name())
    }

    /// A new directory whose name contains `label`.
    pub fn named(label: &str) -> TestDir {
        let mut label = sanitize(label);
        let mut base = std::env::temp_dir();
        // sun_path is 108 bytes. Leave room for "/nbdp-PID-N-" and "/peer.sock".
        let budget = 100usize.saturating_sub(base.as_os_str().len() + 40);
        if budget < 8 {
            base = PathBuf::from("/tmp");
        } else if label.len() > budget {
            label = label[label.len() - budget..].to_string();
        }
        let path = create_unique_dir(&base, &label)
            .unwrap_or_else(|e| panic!("cannot create a temp dir under {}: {e}", base.display()));
        let shm = Path::new("/dev/shm");
        let data = if shm.is_dir() {
            create_unique_dir(shm, &label).unwrap_or_else(|_| path.clone())
        } else {
            path.clone()
        };
        TestDir { path, data }
    }

    /// The directory for sockets, pid files, configs and logs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The directory for data files (under `/dev/shm` when it exists).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `data_dir().join(name)`.
    pub fn data_path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.data.join(name)
    }

    /// Creates `data_dir()/name`: `size` bytes of the deterministic pattern
    /// for `seed` (see [`pattern`]). Returns its path.
    pub fn pattern_file(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        let p = self.data_path(name);
        write_pattern_file(&p, size, seed);
        p
    }
    /// A qcow2 image over a raw backing file, with the persistent dirty bitmap `bm0`
    /// (needs `qemu-img` and `qemu-io`): data from the backing file in [0, 1M), local data
    /// in [2M, 2.5M) and local zeroes in [8M, 9M), both marked dirty. 64 MiB.
    pub fn bitmap_image(&self) -> PathBuf {
        let base = self.data_path("base.raw");
        let top = self.data_path("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        let qi = |args: &[&str]| run_ok(&mut command("qemu-img", args));
        let qio = |args: &[&str]| run_ok(&mut command("qemu-io", args));
        qi(&["create", "-f", "raw", b, "64M"]);
        qio(&["-f", "raw", "-c", "write -P 0xaa 0 1M", b]);
        qi(&["create", "-f", "qcow2", "-F", "raw", "-b", b, t, "64M"]);
        qi(&["bitmap", "--add", t, "bm0"]);
        qio(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xbb 2M 512k",
            "-c",
            "write -z 8M 1M",
            t,
        ]);
        top
    }

    /// Creates `data_dir()/name` as a sparse, all-zero file of `size` bytes.
    pub fn zero_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.data_path(name);
        let f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.set_len(size)
            .unwrap_or_else(|e| panic!("set_len {}: {e}", p.display()));
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("NBD_TEST_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "NBD_TEST_KEEP=1: keeping {} and {}",
                self.path.display(),
                self.data.display()
            );
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
        if self.data != self.path {
            let _ = fs::remove_dir_all(&self.data);
        }
    }
}

/// Word `index` (8 bytes, little-endian) of the pattern for `seed`: a few
/// xorshift64 rounds on `seed` mixed with `index`. Different indices always
/// give different words, so misplaced data is always noticed.
pub fn pattern_word(seed: u64, index: u64) -> u64 {
    let mut x = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D;
    if x == 0 {
        x = 0x2545_F491_4F6C_DD1D;
    }
    for _ in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Bytes `offset..offset + len` of the deterministic pseudo-random pattern
/// for `seed`. Any range can be computed on its own, so a test can check a
/// read at any offset.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    let end = offset + len as u64;
    while pos < end {
        let word = pattern_word(seed, pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let take = (8 - start).min((end - pos) as usize);
        out.extend_from_slice(&word[start..start + take]);
        pos += take as u64;
    }
    out
}

/// Writes `size` bytes of [`pattern`]`(seed, 0, size)` to `path`,
/// replacing any existing file.
pub fn write_pattern_file(path: &Path, size: u64, seed: u64) {
    const CHUNK: u64 = 1 << 20;
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        f.write_all(&pattern(seed, off, n as usize))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        off += n;
    }
}

// ---------------------------------------------------------------------------
// TCP ports

/// Returns a free TCP port on 127.0.0.1. It binds port 0, reads the port the
/// kernel chose and drops the listener. No two calls in one process return
/// the same port, so parallel tests do not collide. Another process can
/// still grab the port in between; the `Peer` TCP constructors retry with a
/// new port if the bind fails.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..200 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("free_port: could not find an unused port");
}

// ---------------------------------------------------------------------------
// Processes

/// Returns true if `pid` exists and is not a zombie. It reads `/proc` (no subprocess, so
/// it cannot fail for want of one and report a live server gone): the state of each of
/// the process's threads, since a server whose main thread has exited while others still
/// hold its socket is not gone yet. Daemonised servers are re-parented to PID 1, which may
/// reap them late, so a process whose threads are all zombies counts as gone.
pub fn process_alive(pid: u32) -> bool {
    let live = |stat: &str| {
        // The command name (field 2) may contain spaces: the state follows its last ')'.
        let state = stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next());
        !matches!(state, None | Some("Z" | "X" | "x"))
    };
    match fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks
            .flatten()
            .any(|t| fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| live(&stat))),
        Err(_) => fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| live(&stat)),
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`). Used to avoid signalling a pid that was reused.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces, so skip past its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sends signal `sig` (e.g. `"TERM"`) to `pid` with the `kill` command.
fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls `gone` every few ms until it returns true or `timeout` has passed.
fn wait_until(timeout: Duration, mut gone: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(2);
    loop {
        if gone() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// Stops `pid`: SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL. If
/// `child` is our own `Child` with that pid, it is reaped too. If
/// `start_time` does not match the running process, the pid was reused and
/// nothing is signalled.
fn stop_pid(what: &str, pid: u32, start_time: Option<u64>, mut child: Option<&mut Child>) {
    let gone = |child: &mut Option<&mut Child>| -> bool {
        if let Some(c) = child.as_deref_mut() {
            if c.id() == pid {
                return !matches!(c.try_wait(), Ok(None));
            }
        }
        !process_alive(pid)
    };
    if !gone(&mut child) {
        let current = process_start_time(pid);
        if start_time.is_some() && current.is_some() && current != start_time {
            eprintln!("{what}: pid {pid} now belongs to another process; not signalling it");
            return;
        }
        send_signal(pid, "TERM");
        if !wait_until(STOP_TIMEOUT, || gone(&mut child)) {
            eprintln!("{what}: pid {pid} ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL");
            send_signal(pid, "KILL");
            if !wait_until(Duration::from_secs(2), || gone(&mut child)) {
                eprintln!("{what}: pid {pid} still alive after SIGKILL");
            }
        }
    }
    if let Some(c) = child {
        if c.id() == pid {
            // Still running (the `kill` program missing, say): std's own SIGKILL, so that
            // the wait below cannot block.
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Prints the contents of a log file to stderr under a header.
fn dump_file(title: &str, path: &Path) {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    eprintln!(
        "----- {title} ({}) -----\n{text}----- end of {title} -----",
        path.display()
    );
}

// ---------------------------------------------------------------------------
// NBD URIs

/// Percent-encodes everything except unreserved characters and `/`.
fn uri_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The transport a server listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket in the server's temp dir.
    Unix,
    /// TCP on 127.0.0.1 with a free port.
    Tcp,
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (always 127.0.0.1).
    Tcp(SocketAddr),
}

impl Addr {
    /// The NBD URI for `export` at this address: `nbd+unix:///EXPORT?socket=PATH`
    /// or `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Addr::Unix(p) => format!(
                "nbd+unix:///{}?socket={}",
                uri_encode(export),
                uri_encode(&p.to_string_lossy())
            ),
            Addr::Tcp(a) => format!("nbd://{a}/{}", uri_encode(export)),
        }
    }

    /// Returns true if a socket is listening at this address. It reads
    /// `/proc/net/unix` or `/proc/net/tcp` without connecting, because a
    /// probe connection would count as a client. Without `/proc` it falls
    /// back to checking the socket file, or to a TCP connect.
    pub fn is_listening(&self) -> bool {
        match self {
            Addr::Unix(p) => match fs::read_to_string("/proc/net/unix") {
                Ok(table) => {
                    let want = p.to_string_lossy();
                    table.lines().skip(1).any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening
                        f.len() >= 8 && f[3] == "00010000" && f[7..].join(" ") == want
                    })
                }
                Err(_) => fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()),
            },
            Addr::Tcp(a) => match fs::read_to_string("/proc/net/tcp") {
                Ok(table) => {
                    let port = format!(":{:04X}", a.port());
                    table.lines().skip(1).any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        // sl local_address rem_address st ...; st 0A = LISTEN
                        f.len() >= 4 && f[1].ends_with(&port) && f[3] == "0A"
                    })
                }
                Err(_) => TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok(),
            },
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Peers (real NBD servers)

/// Which server program a [`Peer`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// `qemu-nbd`
    QemuNbd,
    /// `nbdkit`
    Nbdkit,
    /// The reference `nbd-server`
    NbdServer,
}

impl PeerKind {
    /// The program name.
    pub fn program(self) -> &'static str {
        match self {
            PeerKind::QemuNbd => "qemu-nbd",
            PeerKind::Nbdkit => "nbdkit",
            PeerKind::NbdServer => "nbd-server",
        }
    }

    /// The export name to use when the test does not care: `""` for
    /// qemu-nbd (without `-x`) and nbdkit, `"disk"` for nbd-server.
    pub fn default_export(self) -> &'static str {
        match self {
            PeerKind::NbdServer => NBD_SERVER_EXPORT,
            _ => "",
        }
    }
}

/// A running NBD server daemon, stopped on drop.
///
/// `Drop` sends SIGTERM to the pid from the server's pid file, waits up to
/// [`STOP_TIMEOUT`] (a zombie counts as gone), then sends SIGKILL. It then
/// removes the server's temp dir, which holds the socket, pid file, log and
/// config. If the test is panicking, it also prints the server's log.
pub struct Peer {
    kind: PeerKind,
    addr: Addr,
    pid: u32,
    start_time: Option<u64>,
    /// The launcher, kept only if it did not exit (i.e. the server runs in
    /// the foreground and is our own child).
    launcher: Option<Child>,
    command: String,
    log: PathBuf,
    // Declared last, so it is dropped after the server is stopped.
    dir: TestDir,
}

/// Why one attempt at starting a server failed.
enum StartError {
    /// The launching command exited with an error status.
    Launch(ExitStatus),
    /// The server wrote its pid file and then died before it listened.
    Died(u32),
    /// Nothing listened within [`START_TIMEOUT`].
    Timeout,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Launch(s) => write!(f, "the command failed ({s})"),
            StartError::Died(pid) => write!(f, "server pid {pid} exited during startup"),
            StartError::Timeout => write!(f, "not listening after {START_TIMEOUT:?}"),
        }
    }
}

impl Peer {
    /// `qemu-nbd` serving `file` on a Unix socket. See [`Peer::qemu_nbd_on`].
    pub fn qemu_nbd(file: impl AsRef<Path>, extra_args: &[&str]) -> Peer {
        Peer::qemu_nbd_on(Transport::Unix, file, extra_args)
    }

    /// `qemu-nbd` serving `file` on 127.0.0.1 and a free port.
    pub fn qemu_nbd_tcp(file: impl AsRef<Path>, extra_args: &[&str]) -> Peer {
        Peer::qemu_nbd_on(Transport::Tcp, file, extra_args)
    }

    /// `qemu-nbd --fork --pid-file=PID -t [-f raw] (-k SOCK | -b 127.0.0.1 -p PORT) EXTRA... FILE`.
    ///
    /// `-f raw` is added unless `extra_args` choose a format (`-f`,
    /// `--format`, `--image-opts`). Useful extras: `-r` (read-only), `-x NAME`
    /// (export name), `-e N` (N clients; with N > 1 the export also
    /// advertises CAN_MULTI_CONN), `-A`, `-B BITMAP`, `-D TEXT`.
    pub fn qemu_nbd_on(transport: Transport, file: impl AsRef<Path>, extra_args: &[&str]) -> Peer {
        let file = absolute(file.as_ref());
        let has_format = extra_args
            .iter()
            .any(|a| *a == "-f" || a.starts_with("--format") || *a == "--image-opts");
        let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        Peer::start(PeerKind::QemuNbd, transport, |dir, addr, pidfile| {
            let mut c = Command::new("qemu-nbd");
            c.arg("--fork")
                .arg(format!("--pid-file={}", pidfile.display()))
                .arg("-t");
            if !has_format {
                c.args(["-f", "raw"]);
            }
            match addr {
                Addr::Unix(p) => {
                    c.arg("-k").arg(p);
                }
                Addr::Tcp(a) => {
                    c.args(["-b", "127.0.0.1", "-p", &a.port().to_string()]);
                }
            }
            c.args(&extra).arg(&file).current_dir(dir.path());
            c
        })
    }

    /// `nbdkit` on a Unix socket. See [`Peer::nbdkit_on`].
    pub fn nbdkit(args: &[&str]) -> Peer {
        Peer::nbdkit_on(Transport::Unix, args)
    }

    /// `nbdkit` on 127.0.0.1 and a free port.
    pub fn nbdkit_tcp(args: &[&str]) -> Peer {
        Peer::nbdkit_on(Transport::Tcp, args)
    }

    /// `nbdkit (-U SOCK | -i 127.0.0.1 -p PORT) -P PID ARGS...`.
    ///
    /// `args` are server options, then plugin and parameters, e.g.
    /// `["memory", "64M"]`, `["-r", "memory", "1M"]`, `["-o", "memory", "1M"]`
    /// (oldstyle), `["--no-sr", "memory", "1M"]`, or
    /// `["--filter=error", "memory", "64M", "error=EIO", "error-pread-rate=100%"]`.
    pub fn nbdkit_on(transport: Transport, args: &[&str]) -> Peer {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Peer::start(PeerKind::Nbdkit, transport, |dir, addr, pidfile| {
            let mut c = Command::new("nbdkit");
            match addr {
                Addr::Unix(p) => {
                    c.arg("-U").arg(p);
                }
                Addr::Tcp(a) => {
                    c.args(["-i", "127.0.0.1", "-p", &a.port().to_string()]);
                }
            }
            c.arg("-P").arg(pidfile).args(&args).current_dir(dir.path());
            c
        })
    }

    /// `nbd-server` exporting `file` as `disk` on a Unix socket. See
    /// [`Peer::nbd_server_on`].
    pub fn nbd_server(file: impl AsRef<Path>, export_options: &[&str]) -> Peer {
        Peer::nbd_server_on(Transport::Unix, file, export_options)
    }

    /// `nbd-server` exporting `file` as `disk` on 127.0.0.1 and a free port.
    pub fn nbd_server_tcp(file: impl AsRef<Path>, export_options: &[&str]) -> Peer {
        Peer::nbd_server_on(Transport::Tcp, file, export_options)
    }

    /// `nbd-server -C CONF -p PID`. `CONF` is written to the temp dir:
    ///
    /// ```text
    /// [generic]
    ///     unixsock = SOCK          (or: listenaddr = 127.0.0.1 / port = PORT)
    ///     allowlist = true
    /// [disk]
    ///     exportname = FILE
    ///     EXPORT_OPTIONS...        (e.g. "readonly = true", "flush = true", "fua = true", "trim = true")
    /// ```
    ///
    /// An option line that starts with `[` begins a new section, so
    /// `&["[ro]", "exportname = /path", "readonly = true"]` adds a second
    /// export. The export name is [`NBD_SERVER_EXPORT`] (`disk`). It has no
    /// default export, so use `uri("disk")` or [`Peer::default_uri`].
    pub fn nbd_server_on(
        transport: Transport,
        file: impl AsRef<Path>,
        export_options: &[&str],
    ) -> Peer {
        let file = absolute(file.as_ref());
        let options: Vec<String> = export_options.iter().map(|s| s.to_string()).collect();
        Peer::start(PeerKind::NbdServer, transport, |dir, addr, pidfile| {
            let mut conf = String::from("[generic]\n");
            match addr {
                Addr::Unix(p) => conf.push_str(&format!("    unixsock = {}\n", p.display())),
                Addr::Tcp(a) => conf.push_str(&format!(
                    "    listenaddr = 127.0.0.1\n    port = {}\n",
                    a.port()
                )),
            }
            conf.push_str("    allowlist = true\n");
            conf.push_str(&format!(
                "[{NBD_SERVER_EXPORT}]\n    exportname = {}\n",
                file.display()
            ));
            for line in &options {
                let line = line.trim();
                if line.starts_with('[') {
                    conf.push_str(&format!("{line}\n"));
                } else {
                    conf.push_str(&format!("    {line}\n"));
                }
            }
            let conf_path = dir.join("nbd-server.conf");
            fs::write(&conf_path, conf)
                .unwrap_or_else(|e| panic!("write {}: {e}", conf_path.display()));
            let mut c = Command::new("nbd-server");
            c.arg("-C")
                .arg(&conf_path)
                .arg("-p")
                .arg(pidfile)
                .current_dir(dir.path());
            c
        })
    }

    /// Starts a server built by `build(dir, addr, pidfile)` and waits until
    /// it listens. On TCP it retries with a new port if the bind may have
    /// lost a race.
    fn start(
        kind: PeerKind,
        transport: Transport,
        build: impl Fn(&TestDir, &Addr, &Path) -> Command,
    ) -> Peer {
        let dir = TestDir::named(&format!("{}-{}", test_name(), kind.program()));
        let pidfile = dir.join("peer.pid");
        let log = dir.join("peer.log");
        let attempts = if transport == Transport::Tcp { 3 } else { 1 };
        for attempt in 1..=attempts {
            let addr = match transport {
                Transport::Unix => Addr::Unix(dir.join("peer.sock")),
                Transport::Tcp => Addr::Tcp(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::LOCALHOST,
                    free_port(),
                ))),
            };
            let _ = fs::remove_file(&pidfile);
            let mut cmd = build(&dir, &addr, &pidfile);
            let command = format!("{cmd:?}");
            let logf =
                File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let logf2 = logf.try_clone().expect("clone log file handle");
            cmd.stdin(Stdio::null()).stdout(logf).stderr(logf2);
            let launcher = cmd.spawn().unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (is it installed?): {e}\ncommand: {command}",
                    kind.program()
                )
            });
            match wait_ready(launcher, &addr, &pidfile) {
                Ok((pid, launcher)) => {
                    return Peer {
                        kind,
                        start_time: process_start_time(pid),
                        addr,
                        pid,
                        launcher,
                        command,
                        log,
                        dir,
                    };
                }
                Err(err) => {
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    let port_race = text.contains("in use") || matches!(err, StartError::Died(_));
                    let hint = if kind == PeerKind::NbdServer && text.trim().is_empty() {
                        "\n(nbd-server logs to syslog, not to peer.log; it also ignores unknown \
                         config options. On TCP the usual cause is a port clash.)"
                    } else {
                        ""
                    };
                    let msg = format!(
                        "{} failed to start on {addr}: {err}{hint}\ncommand: {command}\nlog ({}):\n{text}",
                        kind.program(),
                        log.display()
                    );
                    if transport == Transport::Tcp && port_race && attempt < attempts {
                        eprintln!("{msg}\nretrying with another port");
                        continue;
                    }
                    panic!("{msg}");
                }
            }
        }
        unreachable!()
    }

    /// What this server runs.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The NBD URI for `export`, e.g. `nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        self.addr.uri(export)
    }

    /// The URI of the default export: `""`, or `"disk"` for nbd-server.
    pub fn default_uri(&self) -> String {
        self.uri(self.kind.default_export())
    }

    /// Where the server listens.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// The Unix socket path, if the server listens on one.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.addr {
            Addr::Unix(p) => Some(p),
            Addr::Tcp(_) => None,
        }
    }

    /// The TCP address, if the server listens on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.addr {
            Addr::Tcp(a) => Some(*a),
            Addr::Unix(_) => None,
        }
    }

    /// The TCP port, if the server listens on TCP.
    pub fn port(&self) -> Option<u16> {
        self.tcp_addr().map(|a| a.port())
    }

    /// The server's pid (from its pid file).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's temp dir (socket, `peer.pid`, `peer.log`, and
    /// `nbd-server.conf`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command line used to start the server.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// What the server printed before it detached. Daemons send later
    /// output to /dev/null or syslog.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Returns true if the server process is still running.
    pub fn is_running(&self) -> bool {
        process_alive(self.pid)
    }

    /// Stops the server now (same as dropping it).
    pub fn stop(self) {}

    /// Kills the server with SIGKILL, as a crash would (it gets no chance to
    /// reply or close sockets cleanly), and waits up to [`STOP_TIMEOUT`] for
    /// it to be gone. Returns true if it is gone. The pid is only signalled
    /// if it still belongs to the server. Dropping the peer afterwards only
    /// cleans up.
    pub fn kill(&self) -> bool {
        if self.start_time.is_none() || process_start_time(self.pid) == self.start_time {
            send_signal(self.pid, "KILL");
        }
        wait_until(STOP_TIMEOUT, || !process_alive(self.pid))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        stop_pid(
            self.kind.program(),
            self.pid,
            self.start_time,
            self.launcher.as_mut(),
        );
        if thread::panicking() {
            eprintln!(
                "{} on {} was started as: {}",
                self.kind.program(),
                self.addr,
                self.command
            );
            dump_file(self.kind.program(), &self.log);
        }
    }
}

/// Waits until the server has written a live pid to `pidfile` and listens
/// at `addr`. Returns the pid, and the launcher if it is still running (a
/// server in the foreground).
fn wait_ready(
    mut launcher: Child,
    addr: &Addr,
    pidfile: &Path,
) -> Result<(u32, Option<Child>), StartError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut launcher_done = false;
    let mut nap = Duration::from_millis(1);
    let result = loop {
        if !launcher_done {
            if let Ok(Some(status)) = launcher.try_wait() {
                if !status.success() {
                    break Err(StartError::Launch(status));
                }
                launcher_done = true;
            }
        }
        let pid = fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let own_child = !launcher_done && pid == launcher.id();
            if !own_child && !process_alive(pid) {
                break Err(StartError::Died(pid));
            }
            if addr.is_listening() {
                break Ok(pid);
            }
        }
        if Instant::now() >= deadline {
            break Err(StartError::Timeout);
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    match result {
        Ok(pid) => Ok((pid, (!launcher_done).then_some(launcher))),
        Err(e) => {
            // Clean up whatever got started.
            if let Some(pid) = fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                if pid != launcher.id() {
                    stop_pid("server", pid, None, None);
                }
            }
            if !launcher_done {
                let pid = launcher.id();
                stop_pid("server launcher", pid, None, Some(&mut launcher));
            }
            Err(e)
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

// ---------------------------------------------------------------------------
// Our own processes (example binaries, foreground servers)

/// A child process started by the test: e.g. one of this crate's example
/// binaries, or a server in the foreground. Its stdout and stderr go to
/// files in its temp dir. On drop it is stopped (SIGTERM, then SIGKILL after
/// [`STOP_TIMEOUT`]) and reaped. If the test is panicking, its output is
/// printed.
pub struct Spawned {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
    // Declared last, so it is dropped after the child is stopped.
    dir: TestDir,
}

impl Spawned {
    /// Spawns `cmd` with a fresh temp dir for its output.
    pub fn spawn(cmd: &mut Command) -> Spawned {
        Spawned::spawn_in(TestDir::new(), cmd)
    }

    /// Spawns `cmd` and keeps `dir` until drop. Create the dir first when the
    /// command needs paths inside it, e.g. `dir.join("sock")`.
    pub fn spawn_in(dir: TestDir, cmd: &mut Command) -> Spawned {
        let name = format!("{cmd:?}");
        let n = next_id();
        let stdout = dir.join(format!("spawned-{n}.stdout"));
        let stderr = dir.join(format!("spawned-{n}.stderr"));
        let out =
            File::create(&stdout).unwrap_or_else(|e| panic!("create {}: {e}", stdout.display()));
        let err =
            File::create(&stderr).unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        Spawned {
            name,
            child,
            status: None,
            stdout,
            stderr,
            dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir that belongs to this process.
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// Everything the process has written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    /// Everything the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// The exit status, if the process has exited. Does not block.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// Waits up to [`RUN_TIMEOUT`] for the process to exit. Panics, showing
    /// its output, if it does not.
    pub fn wait(&mut self) -> ExitStatus {
        match self.wait_timeout(RUN_TIMEOUT) {
            Some(s) => s,
            None => self.fail(&format!("did not exit within {RUN_TIMEOUT:?}")),
        }
    }

    /// Waits until `cond` holds. Panics if the process exits first, or after
    /// [`START_TIMEOUT`].
    pub fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Spawned) -> bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if cond(self) {
                return;
            }
            if let Some(s) = self.try_wait() {
                // It may have become true just before the exit.
                if cond(self) {
                    return;
                }
                self.fail(&format!("exited ({s}) while waiting for {what}"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "timed out after {START_TIMEOUT:?} waiting for {what}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a Unix socket at `path` is listening.
    pub fn wait_for_unix_socket(&mut self, path: impl AsRef<Path>) {
        let addr = Addr::Unix(path.as_ref().to_path_buf());
        self.wait_for(&format!("{addr} to listen"), |_| addr.is_listening());
    }

    /// Waits until 127.0.0.1:`port` is listening.
    pub fn wait_for_tcp_port(&mut self, port: u16) {
        let addr = Addr::Tcp(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)));
        self.wait_for(&format!("{addr} to listen"), |_| addr.is_listening());
    }

    /// Waits until stdout contains `needle`.
    pub fn wait_for_stdout(&mut self, needle: &str) {
        self.wait_for(&format!("{needle:?} on stdout"), |s| {
            s.stdout().contains(needle)
        });
    }

    /// Stops the process (SIGTERM, then SIGKILL) and returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let pid = self.child.id();
            stop_pid(&self.name, pid, None, Some(&mut self.child));
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn fail(&mut self, why: &str) -> ! {
        let (out, err) = (self.stdout(), self.stderr());
        self.stop();
        panic!(
            "{}: {why}\n--- stdout ---\n{out}--- stderr ---\n{err}",
            self.name
        );
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("spawned process: {}", self.name);
            dump_file("stdout", &self.stdout);
            dump_file("stderr", &self.stderr);
        }
    }
}

/// The path of this crate's example binary `name`, e.g.
/// `target/debug/examples/NAME`. `cargo test` builds the examples, but not
/// when only one `--test` target is selected. Panics with a hint if the
/// binary is missing.
pub fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>  ->  target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not in target/<profile>/deps");
    let p = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !p.is_file() {
        panic!(
            "example binary `{name}` not found at {}; build it with `cargo build --example {name}` \
             (or run plain `cargo test`, which builds all examples)",
            p.display()
        );
    }
    p
}

// ---------------------------------------------------------------------------
// Client commands

/// `Command::new(program).args(args)`.
pub fn command(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `PATH` with `/usr/bin` first, so the system python3 (with the libnbd
/// bindings) is found before a pyenv one.
fn path_with_usr_bin_first() -> std::ffi::OsString {
    let mut parts = vec![PathBuf::from("/usr/bin")];
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(parts).expect("join PATH")
}

/// An `nbdsh` command with `PATH=/usr/bin:$PATH`, e.g.
/// `run(&mut nbdsh(&["-u", &uri, "-c", "print(h.get_size())"]))`.
pub fn nbdsh(args: &[&str]) -> Command {
    let mut c = Command::new("nbdsh");
    c.env("PATH", path_with_usr_bin_first()).args(args);
    c
}

/// Runs a client command and waits up to [`RUN_TIMEOUT`]. See [`run_timeout`].
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, RUN_TIMEOUT)
}

/// Runs `cmd` with stdin from /dev/null and returns its output. Stdout and
/// stderr go through temp files, so a grandchild that keeps them open
/// cannot hang us.
///
/// * If it runs longer than `timeout`, it is killed and this panics with the
///   command and the output so far.
/// * If it exits with an error, the command, status, stdout and stderr are
///   printed to stderr (the test harness shows them when the test fails).
///   The `Output` is still returned, so the caller can check for expected
///   failures.
/// * If the program is `nbdsh` and `PATH` was not set, `/usr/bin` is put
///   first in `PATH`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let is_nbdsh = Path::new(cmd.get_program()).file_name() == Some(OsStr::new("nbdsh"));
    if is_nbdsh && !cmd.get_envs().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", path_with_usr_bin_first());
    }
    let desc = format!("{cmd:?}");
    let base = std::env::temp_dir().join(format!("nbdp-run-{}-{}", std::process::id(), next_id()));
    let out_path = base.with_extension("stdout");
    let err_path = base.with_extension("stderr");
    let out =
        File::create(&out_path).unwrap_or_else(|e| panic!("create {}: {e}", out_path.display()));
    let err =
        File::create(&err_path).unwrap_or_else(|e| panic!("create {}: {e}", err_path.display()));
    let read_and_remove = || {
        let o = fs::read(&out_path).unwrap_or_default();
        let e = fs::read(&err_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        (o, e)
    };
    let mut child = match cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn() {
        Ok(c) => c,
        Err(e) => {
            read_and_remove();
            panic!("cannot run {desc}: {e}");
        }
    };
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let (o, e) = read_and_remove();
        panic!(
            "command timed out after {timeout:?} and was killed: {desc}\n--- stdout ---\n{}--- stderr ---\n{}",
            String::from_utf8_lossy(&o),
            String::from_utf8_lossy(&e)
        );
    };
    let (stdout, stderr) = read_and_remove();
    let output = Output {
        status,
        stdout,
        stderr,
    };
    if !output.status.success() {
        eprintln!(
            "command failed ({}): {desc}\n--- stdout ---\n{}--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Runs `cmd` (see [`run`]), panics unless it succeeds, and returns its
/// stdout as a `String`.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "command failed ({}): {desc}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`example_path`], but first runs `cargo build --example NAME` (once
/// per example and test process, in the target dir and profile this test
/// binary was built in), so the binary exists and is up to date even when
/// only one `--test` target was built. Cargo does not hold its build lock
/// while tests run, so this does not deadlock. If cargo cannot be run (the
/// test binary was started directly), the existing binary is used.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.insert(name.to_string()) {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test binary>
        let profile_dir = exe.parent().and_then(Path::parent);
        let target_dir = profile_dir.and_then(Path::parent);
        if let (Some(profile_dir), Some(target_dir)) = (profile_dir, target_dir) {
            let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
                Some("debug") | None => "dev",
                Some(p) => p,
            };
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--quiet", "--example", name, "--profile", profile])
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cargo build --example {name} failed ({}); using the existing binary\n{}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cannot run cargo ({e}); using the existing binary"),
            }
        }
    }
    drop(built);
    example_path(name)
}

/// Certificates for one test: `server/` holds what nbdkit's `--tls-certificates` reads
/// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, for `localhost` and 127.0.0.1);
/// `client/` holds what the client's `tls-certificates=` reads (`ca-cert.pem`, and with
/// `client_cert` a `client-cert.pem` and `client-key.pem` signed by the same CA);
/// `other/` holds a CA that signed nothing here.
pub struct Pki {
    /// What a server's certificate directory holds.
    pub server: PathBuf,
    /// What a client's `tls-certificates=` directory holds.
    pub client: PathBuf,
    /// A CA that signed nothing here.
    pub other: PathBuf,
}

pub fn make_pki(dir: &TestDir, client_cert: bool) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("nbd-proto client TLS test CA");
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let pki = Pki {
        server: dir.join("server"),
        client: dir.join("client"),
        other: dir.join("other"),
    };
    for d in [&pki.server, &pki.client, &pki.other] {
        std::fs::create_dir(d).unwrap();
    }
    let (cert, key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::write(pki.server.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(pki.server.join("server-cert.pem"), cert).unwrap();
    std::fs::write(pki.server.join("server-key.pem"), key).unwrap();
    std::fs::write(pki.client.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    if client_cert {
        let (cert, key) = leaf(vec![], "nbd-client", ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(pki.client.join("client-cert.pem"), cert).unwrap();
        std::fs::write(pki.client.join("client-key.pem"), key).unwrap();
    }
    let (other_cert, _) = ca("a CA that signed nothing here");
    std::fs::write(pki.other.join("ca-cert.pem"), other_cert.pem()).unwrap();
    pki
}

// ---------------------------------------------------------------------------------------------
// The `nbd-trace` example as a witness
// ---------------------------------------------------------------------------------------------

/// A running `nbd-trace` proxy in front of a server, writing its trace to a log file: tests
/// point a client at [`Trace::uri`] and read what crossed the wire. Declare it after the
/// server it forwards to, so that it is stopped first.
pub struct Trace {
    proc: Spawned,
    log: PathBuf,
    sock: PathBuf,
}

impl Trace {
    /// `nbd-trace --listen unix:DIR/trace.sock --connect TARGET --log DIR/trace.log`.
    pub fn start(target: &Addr) -> Trace {
        let dir = TestDir::named(&format!("{}-trace", test_name()));
        let log = dir.join("trace.log");
        let sock = dir.join("trace.sock");
        let mut cmd = Command::new(example_binary("nbd-trace"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--connect")
            .arg(target.to_string())
            .arg("--log")
            .arg(&log);
        let mut proc = Spawned::spawn_in(dir, &mut cmd);
        proc.wait_for_unix_socket(&sock);
        Trace { proc, log, sock }
    }

    /// The URI of `export` through the proxy.
    pub fn uri(&self, export: &str) -> String {
        Addr::Unix(self.sock.clone()).uri(export)
    }

    /// Waits (up to 20 s) until every connection the proxy accepted has closed, then
    /// returns the trace.
    pub fn settle(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let accepted = log.matches("] accepted ").count();
            let ended = log.matches("] closed: ").count() + log.matches("] cannot connect").count();
            if accepted > 0 && ended == accepted {
                return log;
            }
            if Instant::now() >= deadline || self.proc.try_wait().is_some() {
                panic!(
                    "trace did not settle ({accepted} accepted, {ended} closed); stderr:\n{}\ntrace:\n{log}",
                    self.proc.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`settle`](Self::settle), and the proxy decoded everything.
    pub fn settle_clean(&mut self) -> String {
        let log = self.settle();
        assert!(!log.contains("decode error"), "{log}");
        log
    }
}
