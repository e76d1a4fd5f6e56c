//! A counting global allocator for the hostile-peer suites, so that "bounded memory" is
//! measured rather than assumed.
//!
//! The allocator keeps, per thread, the bytes currently allocated and their peak. A
//! [`Bound`] marks where a test starts; when the last live `Bound` of the thread is
//! dropped (at the end of the test, unless it is already failing) it asserts that the
//! thread's heap never grew more than the stated limit above that mark. Every harness of
//! the hostile suites holds one, so every test is measured. Set `NBD_HEAP_REPORT=1` to
//! print each test's peak.
//!
//! Counting is per thread because libtest runs each test on its own thread; memory freed
//! by another thread than the one that allocated it is credited to the freeing thread,
//! which can only lower a peak that the allocating thread already recorded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    /// Bytes allocated and not yet freed by this thread.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The highest `LIVE` since the outermost `Bound` was created.
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// `LIVE` when the outermost `Bound` was created.
    static BASE: Cell<isize> = const { Cell::new(0) };
    /// Live `Bound`s on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

fn add(delta: isize) {
    // `try_with`: the allocator is also called while thread-locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping only touches
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }
}

/// The most heap a test may use above what its thread held when the test began.
pub struct Bound {
    limit: usize,
}

impl Bound {
    /// Starts (or, when one is already live on this thread, joins) a measurement.
    pub fn new(limit: usize) -> Self {
        if DEPTH.get() == 0 {
            let live = LIVE.get();
            BASE.set(live);
            PEAK.set(live);
        }
        DEPTH.set(DEPTH.get() + 1);
        Self { limit }
    }

    /// The thread's peak heap above the mark, so far.
    pub fn peak() -> usize {
        (PEAK.get() - BASE.get()).max(0) as usize
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        if DEPTH.get() > 0 || std::thread::panicking() {
            return;
        }
        let peak = Self::peak();
        if std::env::var_os("NBD_HEAP_REPORT").is_some() {
            eprintln!(
                "heap peak {peak:>9} B  {}",
                std::thread::current().name().unwrap_or("?")
            );
        }
        assert!(
            peak <= self.limit,
            "the test's heap peaked at {peak} bytes, over its bound of {} bytes",
            self.limit
        );
    }
}

/// A harness value measured for as long as it lives (for harnesses defined elsewhere,
/// such as `nbd_proto::testing::Pair`).
pub struct Measured<T> {
    inner: T,
    _bound: Bound,
}

impl<T> Measured<T> {
    /// Starts the measurement, then builds the value, so its own allocations count.
    pub fn new(limit: usize, make: impl FnOnce() -> T) -> Self {
        let bound = Bound::new(limit);
        Self {
            inner: make(),
            _bound: bound,
        }
    }
}

impl<T> std::ops::Deref for Measured<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> std::ops::DerefMut for Measured<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}
