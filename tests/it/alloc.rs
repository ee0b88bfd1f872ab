//! A counting allocator for the test binary: it keeps each thread's live heap bytes and their
//! peak, so that a test can measure the most one call has allocated at once ([`peak_during`]) —
//! exactly, and without noise from the tests running on other threads. (The OS's peak RSS of a
//! child process cannot do this here: a child spawned from the test process inherits the test
//! process's own peak.) It only counts; every allocation is the system allocator's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

/// Adds `n` (negative when freed) to this thread's live bytes. Before a thread's locals exist
/// or after they are gone nothing is counted, which no measurement spans.
fn count(n: i64) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + n;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are this allocator's; counting touches only `Cell`s of plain integers, which
// neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The old and the new block may both be live during the move: count the new one first.
        count(new_size as i64);
        // SAFETY: `ptr` and `layout` come from `System`; `new_size` is the caller's, as valid.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        count(-(if p.is_null() { new_size } else { layout.size() } as i64));
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it had allocated (and not yet freed) at
/// any one time on this thread.
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get) - start;
    (result, peak.max(0) as u64)
}
