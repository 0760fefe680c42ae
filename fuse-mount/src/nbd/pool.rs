//! Reusable buffers for READ replies and WRITE payloads.
//!
//! A 256 KiB read costs a `pread` copy and a socket copy; a fresh zeroed buffer would add a third
//! pass over the data (the zeroing) and a trip to the allocator. Buffers go back to a pool when
//! their reply is written, and stay initialised: a [`Reply`] tracks how many of its bytes are the
//! reply, so reusing a buffer zeroes only what it has never held.

use std::sync::Mutex;

/// Buffers smaller than this are not worth pooling.
pub const MIN_POOLED: usize = 64 * 1024;

/// A bounded pool of byte buffers.
#[derive(Debug)]
pub struct BufferPool {
    /// Free buffers and their total length.
    free: Mutex<(Vec<Vec<u8>>, usize)>,
    max_bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_bytes` of free buffers.
    pub fn new(max_bytes: usize) -> Self {
        BufferPool {
            free: Mutex::new((Vec::new(), 0)),
            max_bytes,
        }
    }

    /// A buffer of at least `len` initialised bytes (a pooled one when there is one).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let pooled = match self.free.lock() {
            Ok(mut free) => {
                let buf = free.0.pop();
                if let Some(b) = &buf {
                    free.1 -= b.len();
                }
                buf
            }
            Err(_) => None,
        };
        let mut buf = pooled.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// Returns a buffer to the pool (dropped when the pool is full or the buffer small).
    pub fn give(&self, buf: Vec<u8>) {
        if buf.len() < MIN_POOLED {
            return;
        }
        if let Ok(mut free) = self.free.lock()
            && free.1 + buf.len() <= self.max_bytes
        {
            free.1 += buf.len();
            free.0.push(buf);
        }
    }
}

/// A reply under construction: the first `len` bytes of `buf` are the reply.
#[derive(Debug, Default)]
pub struct Reply {
    buf: Vec<u8>,
    len: usize,
}

impl Reply {
    /// An empty reply written into `buf` (whose old bytes are overwritten as it fills).
    pub fn in_buffer(buf: Vec<u8>) -> Self {
        Reply { buf, len: 0 }
    }

    /// Appends `bytes`.
    pub fn put(&mut self, bytes: &[u8]) {
        self.space(bytes.len()).copy_from_slice(bytes);
    }

    /// Appends `n` bytes for the caller to fill, and returns them.
    pub fn space(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let start = self.len;
        self.len = end;
        &mut self.buf[start..end]
    }

    /// The reply's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The buffer, for the pool.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl From<Vec<u8>> for Reply {
    fn from(buf: Vec<u8>) -> Self {
        let len = buf.len();
        Reply { buf, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_keep_their_length_and_reply_only_what_was_put() {
        let pool = BufferPool::new(1 << 20);
        let mut buf = pool.take(MIN_POOLED);
        buf.fill(7);
        pool.give(buf);
        let mut reply = Reply::in_buffer(pool.take(10));
        reply.put(&[1, 2, 3]);
        assert_eq!(reply.bytes(), &[1, 2, 3]);
        assert_eq!(
            reply.into_buffer().len(),
            MIN_POOLED,
            "no shrinking, no zeroing"
        );
    }

    #[test]
    fn the_pool_keeps_at_most_its_byte_cap() {
        let pool = BufferPool::new(MIN_POOLED);
        pool.give(vec![0; MIN_POOLED]);
        pool.give(vec![0; MIN_POOLED]);
        assert_eq!(pool.free.lock().unwrap().0.len(), 1);
        pool.give(vec![0; 16]);
        assert_eq!(pool.free.lock().unwrap().0.len(), 1);
    }
}
