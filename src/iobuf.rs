//! Buffers for direct I/O: anonymous mappings sliced to start on a 4096-byte boundary, or, when
//! they hold a huge page or more, on a huge-page boundary and advised for transparent huge
//! pages.
//!
//! A direct write or read is split into one disk request per stretch of physically contiguous
//! memory the device takes at once (this machine's virtio disk takes 254 segments per request),
//! so a 2 MiB direct write from 4 KiB pages goes out as 2–4 requests, and from a huge page as
//! one. Measured (`mergestream expo`, 1.8 GB pair, warm, eight alternating runs, 2026-11-26):
//! staging buffers on huge pages ran in 0.67–0.75 s against 0.79–0.90 s, with less CPU
//! (1.14–1.19 s against 1.21–1.26 s).

/// Direct I/O alignment of buffers (a page; covers 512 and 4096 sectors).
pub const ALIGN: usize = 4096;
/// The size (and alignment) of a transparent huge page on x86-64.
pub const HUGE_PAGE: usize = 2 << 20;

/// A zeroed buffer of `len` bytes whose start is [`ALIGN`]-aligned, and [`HUGE_PAGE`]-aligned
/// and advised for huge pages when `len` is at least one.
#[derive(Debug)]
pub struct IoBuf {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// Maps the buffer. Like a `Vec`'s allocation, it aborts the process when there is no
    /// memory for it.
    pub fn new(len: usize) -> IoBuf {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { ALIGN };
        // The slack before the aligned start is never touched, so it takes no memory.
        let map = memmap2::MmapMut::map_anon(len + align).unwrap_or_else(|_| {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len + align, ALIGN).expect("a valid layout"),
            )
        });
        let start = map.as_ptr().align_offset(align);
        if align == HUGE_PAGE {
            // Advice only: where huge pages are off it fails or does nothing, and requests are
            // split as they would be anyway.
            let _ = map.advise_range(
                memmap2::Advice::HugePage,
                start,
                len / HUGE_PAGE * HUGE_PAGE,
            );
        }
        IoBuf { map, start, len }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }

    /// Bytes the buffer holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_as_long_as_asked() {
        for len in [
            0,
            1,
            ALIGN,
            3 * ALIGN + 5,
            HUGE_PAGE,
            HUGE_PAGE + ALIGN,
            3 * HUGE_PAGE,
        ] {
            let mut buf = IoBuf::new(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_slice().len(), len);
            let align = if len >= HUGE_PAGE { HUGE_PAGE } else { ALIGN };
            assert_eq!(buf.as_slice().as_ptr() as usize % align, 0, "len {len}");
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice().fill(7);
            assert!(buf.as_slice().iter().all(|&b| b == 7));
        }
    }
}
