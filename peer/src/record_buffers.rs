//! Buffers of settled outbox records, kept for the next records encoded on the same
//! thread.
//!
//! A single publish allocates its record and the settle of its ack frees it. Settles
//! come in runs of thousands (one `Ack` frame each), far more than glibc's per-thread
//! cache holds (7 chunks per size), so both ends took `malloc`'s slow paths: ~415 of
//! the ~5,700 instructions of a single 128-byte `Memory` message. The link that
//! settles usually runs on the publisher's thread (the worker's LIFO slot keeps it
//! there), so a small per-thread list of freed buffers serves most records without
//! `malloc` or `free`; on a thread that only settles, the list just fills and further
//! buffers are freed as before.

use bytes::Bytes;
use std::cell::RefCell;

/// Buffers kept per thread: more than one `Ack` frame settles at once (a frame
/// acknowledges up to ~2,000 single publishes of a saturated run).
const KEPT_PER_THREAD: usize = 4096;
/// Capacity kept per thread, all buffers together (a run of ~3,000 128-byte
/// records), held after traffic stops (docs/operations.md, "Allocator").
const KEPT_BYTES_PER_THREAD: usize = 512 * 1024;
/// Largest buffer kept (bytes of capacity).
const LARGEST_KEPT: usize = 1024;

/// A thread's kept buffers and their total capacity.
struct Kept {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

thread_local! {
    static FREE: RefCell<Kept> = const {
        RefCell::new(Kept {
            buffers: Vec::new(),
            bytes: 0,
        })
    };
}

/// An empty buffer for exactly `len` bytes: the last kept one if it is that size.
/// Exactly: `Bytes::from` a `Vec` with spare capacity allocates a header for it, the
/// very cost this saves.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let kept = FREE.with_borrow_mut(|kept| {
        let buf = kept.buffers.pop()?;
        kept.bytes -= buf.capacity();
        Some(buf)
    });
    match kept {
        Some(mut buf) if buf.capacity() == len => {
            buf.clear();
            buf
        }
        // A record of another size: freed, and a new buffer allocated.
        _ => Vec::with_capacity(len),
    }
}

/// Keeps the buffer of a settled record if nothing else refers to it and it is small.
pub(crate) fn give(record: Bytes) {
    if record.len() > LARGEST_KEPT || !record.is_unique() {
        return;
    }
    // Unique: the `Vec` comes back without a copy.
    let buf = Vec::from(record);
    if buf.capacity() > LARGEST_KEPT {
        return;
    }
    FREE.with_borrow_mut(|kept| {
        if kept.buffers.len() < KEPT_PER_THREAD
            && kept.bytes + buf.capacity() <= KEPT_BYTES_PER_THREAD
        {
            kept.bytes += buf.capacity();
            kept.buffers.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_record_buffer_is_reused_by_the_next_record_of_its_size() {
        let mut buf = take(100);
        buf.extend_from_slice(&[7; 100]);
        let ptr = buf.as_ptr();
        give(Bytes::from(buf));
        let again = take(100);
        assert_eq!(again.as_ptr(), ptr, "the same allocation");
        assert!(again.is_empty() && again.capacity() == 100);
    }

    #[test]
    fn shared_large_or_too_small_buffers_are_not_reused() {
        // Still referred to elsewhere (a slice of it is alive): not kept.
        let shared = Bytes::from(vec![1u8; 64]);
        let slice = shared.slice(0..8);
        give(shared);
        let fresh = take(64);
        assert_ne!(fresh.as_ptr(), slice.as_ptr());
        // Larger than kept.
        give(Bytes::from(vec![1u8; LARGEST_KEPT + 1]));
        assert!(take(1).capacity() < LARGEST_KEPT + 1);
        // Kept, but of another size than the next record: a new buffer, of its size.
        give(Bytes::from(vec![1u8; 16]));
        assert_eq!(take(32).capacity(), 32);
        give(Bytes::from(vec![1u8; 64]));
        assert_eq!(take(32).capacity(), 32);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_and_size_of_buffers() {
        std::thread::spawn(|| {
            for _ in 0..KEPT_PER_THREAD + 10 {
                give(Bytes::from(vec![0u8; 8]));
            }
            assert_eq!(FREE.with_borrow(|k| k.buffers.len()), KEPT_PER_THREAD);
        })
        .join()
        .expect("thread");
        std::thread::spawn(|| {
            for _ in 0..KEPT_PER_THREAD {
                give(Bytes::from(vec![0u8; LARGEST_KEPT]));
            }
            let (count, bytes) = FREE.with_borrow(|k| (k.buffers.len(), k.bytes));
            assert_eq!(count, KEPT_BYTES_PER_THREAD / LARGEST_KEPT);
            assert_eq!(bytes, KEPT_BYTES_PER_THREAD);
            take(LARGEST_KEPT);
            assert_eq!(
                FREE.with_borrow(|k| k.bytes),
                KEPT_BYTES_PER_THREAD - LARGEST_KEPT
            );
        })
        .join()
        .expect("thread");
    }
}
