//! NBD error values (proto.md "Error values") and their mapping to host errors.
//!
//! The values equal the common Linux errno numbers, but they are protocol constants, not
//! host values: translate explicitly. [`Errno::from_host`] maps a Linux errno number to
//! the NBD value a server should send (anything without an NBD equivalent becomes
//! `NBD_EINVAL`, as the spec says; `EDQUOT` and `EFBIG` become `NBD_ENOSPC`). With the
//! `std` feature, [`std::io::Error`] converts both ways.

use super::enum_with_unknown;

enum_with_unknown! {
    /// A non-zero NBD error value, as carried by simple replies and error chunks.
    ///
    /// Value 0 means success and is never an `Errno`: decoders turn it into `None` (simple
    /// replies) or an error (error chunks). A client should treat an unknown value like
    /// [`Errno::Inval`] (proto.md), which [`Errno::normalized`] does.
    pub enum Errno(u32) {
        /// `NBD_EPERM` (1): operation not permitted (e.g. a write to a read-only export).
        Perm = 1, "NBD_EPERM",
        /// `NBD_EIO` (5): input/output error.
        Io = 5, "NBD_EIO",
        /// `NBD_ENOMEM` (12): out of memory (servers should avoid it).
        NoMem = 12, "NBD_ENOMEM",
        /// `NBD_EINVAL` (22): invalid argument.
        Inval = 22, "NBD_EINVAL",
        /// `NBD_ENOSPC` (28): no space left (e.g. a write past the end).
        NoSpc = 28, "NBD_ENOSPC",
        /// `NBD_EOVERFLOW` (75): value too large (large or `DF` reads).
        Overflow = 75, "NBD_EOVERFLOW",
        /// `NBD_ENOTSUP` (95): not supported (only for `NBD_CMD_FLAG_FAST_ZERO`).
        NotSup = 95, "NBD_ENOTSUP",
        /// `NBD_ESHUTDOWN` (108): the server is shutting down.
        Shutdown = 108, "NBD_ESHUTDOWN",
    }
}

impl Errno {
    /// Decodes a wire error field: 0 is success (`None`), anything else an `Errno`.
    #[inline]
    pub fn from_wire(value: u32) -> Option<Self> {
        match value {
            0 => None,
            value => Some(Self::from(value)),
        }
    }

    /// The value as it goes on the wire.
    #[inline]
    pub fn to_wire(self) -> u32 {
        u32::from(self)
    }

    /// The value a client should act on: unknown values read as [`Errno::Inval`]
    /// (proto.md: "treat as EINVAL").
    #[inline]
    pub fn normalized(self) -> Self {
        match self {
            Self::Unknown(_) => Self::Inval,
            known => known,
        }
    }

    /// Maps a Linux errno number to the NBD value a server should send.
    ///
    /// Errors with an NBD equivalent keep it; `EDQUOT` and `EFBIG` become `NBD_ENOSPC`
    /// (proto.md); `EROFS` and `EACCES` become `NBD_EPERM`; `EOPNOTSUPP` is `NBD_ENOTSUP`;
    /// everything else becomes `NBD_EINVAL`, as the spec recommends for "unknown" errors.
    pub fn from_host(errno: i32) -> Self {
        match errno {
            linux::EPERM | linux::EACCES | linux::EROFS => Self::Perm,
            linux::EIO => Self::Io,
            linux::ENOMEM => Self::NoMem,
            linux::ENOSPC | linux::EDQUOT | linux::EFBIG => Self::NoSpc,
            linux::EOVERFLOW => Self::Overflow,
            linux::EOPNOTSUPP => Self::NotSup,
            linux::ESHUTDOWN => Self::Shutdown,
            _ => Self::Inval,
        }
    }

    /// The Linux errno number with the same meaning. Unknown values map to `EINVAL`.
    pub fn to_host(self) -> i32 {
        match self.normalized() {
            Self::Perm => linux::EPERM,
            Self::Io => linux::EIO,
            Self::NoMem => linux::ENOMEM,
            Self::NoSpc => linux::ENOSPC,
            Self::Overflow => linux::EOVERFLOW,
            Self::NotSup => linux::EOPNOTSUPP,
            Self::Shutdown => linux::ESHUTDOWN,
            Self::Inval | Self::Unknown(_) => linux::EINVAL,
        }
    }

    /// A short human description, like `strerror`.
    pub fn description(self) -> &'static str {
        match self {
            Self::Perm => "operation not permitted",
            Self::Io => "input/output error",
            Self::NoMem => "cannot allocate memory",
            Self::Inval => "invalid argument",
            Self::NoSpc => "no space left on device",
            Self::Overflow => "value too large",
            Self::NotSup => "operation not supported",
            Self::Shutdown => "server is shutting down",
            Self::Unknown(_) => "unknown error",
        }
    }
}

/// Linux errno numbers used by the host mapping (they are the same on every Linux
/// architecture for these values).
#[allow(missing_docs)]
pub mod linux {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EINVAL: i32 = 22;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

#[cfg(feature = "std")]
mod io_impls {
    use super::Errno;
    use std::io;

    impl Errno {
        /// The [`io::ErrorKind`] closest to this error.
        pub fn kind(self) -> io::ErrorKind {
            match self.normalized() {
                Errno::Perm => io::ErrorKind::PermissionDenied,
                Errno::Io => io::ErrorKind::Other,
                Errno::NoMem => io::ErrorKind::OutOfMemory,
                Errno::NoSpc => io::ErrorKind::StorageFull,
                Errno::Overflow => io::ErrorKind::FileTooLarge,
                Errno::NotSup => io::ErrorKind::Unsupported,
                Errno::Shutdown => io::ErrorKind::ConnectionAborted,
                Errno::Inval | Errno::Unknown(_) => io::ErrorKind::InvalidInput,
            }
        }

        /// Maps an [`io::ErrorKind`] to the NBD value a server should send.
        pub fn from_kind(kind: io::ErrorKind) -> Self {
            match kind {
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
                io::ErrorKind::OutOfMemory => Errno::NoMem,
                io::ErrorKind::StorageFull
                | io::ErrorKind::QuotaExceeded
                | io::ErrorKind::FileTooLarge => Errno::NoSpc,
                io::ErrorKind::Unsupported => Errno::NotSup,
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WriteZero
                | io::ErrorKind::Other => Errno::Io,
                _ => Errno::Inval,
            }
        }
    }

    /// Uses the OS error number when there is one (Linux numbering), the kind otherwise.
    impl From<&io::Error> for Errno {
        fn from(e: &io::Error) -> Self {
            match e.raw_os_error() {
                Some(n) if cfg!(target_os = "linux") => Errno::from_host(n),
                _ => Errno::from_kind(e.kind()),
            }
        }
    }

    impl From<io::Error> for Errno {
        fn from(e: io::Error) -> Self {
            Errno::from(&e)
        }
    }

    /// On Linux the error carries the matching OS error number, so it prints as `strerror`
    /// would; elsewhere it carries the kind and the description.
    impl From<Errno> for io::Error {
        fn from(e: Errno) -> Self {
            if cfg!(target_os = "linux") {
                io::Error::from_raw_os_error(e.to_host())
            } else {
                io::Error::new(e.kind(), e.description())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values() {
        // proto.md "Error values".
        let expected = [
            (1, "NBD_EPERM"),
            (5, "NBD_EIO"),
            (12, "NBD_ENOMEM"),
            (22, "NBD_EINVAL"),
        ];
        for (value, name) in expected {
            assert_eq!(Errno::from(value).spec_name(), Some(name));
        }
        assert_eq!(Errno::from(28), Errno::NoSpc);
        assert_eq!(Errno::from(75), Errno::Overflow);
        assert_eq!(Errno::from(95), Errno::NotSup);
        assert_eq!(Errno::from(108), Errno::Shutdown);
        assert_eq!(Errno::from(7), Errno::Unknown(7));
        assert_eq!(Errno::from_wire(0), None);
        assert_eq!(Errno::from_wire(22), Some(Errno::Inval));
        assert_eq!(Errno::Unknown(7).to_wire(), 7);
        assert_eq!(Errno::Unknown(7).to_string(), "unknown(0x7)");
    }

    #[test]
    fn host_mapping() {
        assert_eq!(Errno::from_host(linux::EDQUOT), Errno::NoSpc);
        assert_eq!(Errno::from_host(linux::EFBIG), Errno::NoSpc);
        assert_eq!(Errno::from_host(linux::EROFS), Errno::Perm);
        assert_eq!(Errno::from_host(2 /* ENOENT */), Errno::Inval);
        assert_eq!(Errno::from_host(-1), Errno::Inval);
        for e in Errno::ALL {
            assert_eq!(Errno::from_host(e.to_host()), *e, "{e}");
        }
        assert_eq!(Errno::Unknown(1000).to_host(), linux::EINVAL);
        assert_eq!(Errno::Unknown(1000).normalized(), Errno::Inval);
    }

    #[cfg(feature = "std")]
    #[test]
    fn io_error_mapping() {
        use std::io;
        for e in Errno::ALL {
            let io: io::Error = (*e).into();
            assert_eq!(Errno::from(&io), *e, "{e} -> {io}");
        }
        let custom = io::Error::new(io::ErrorKind::PermissionDenied, "nope");
        assert_eq!(Errno::from(custom), Errno::Perm);
        assert_eq!(Errno::from(io::Error::other("x")), Errno::Io);
        assert_eq!(Errno::NoSpc.kind(), io::ErrorKind::StorageFull);
        assert_eq!(Errno::from_kind(io::ErrorKind::NotFound), Errno::Inval);
    }
}
