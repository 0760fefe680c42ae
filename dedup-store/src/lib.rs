//! The content-addressed, deduplicated store of VM disks and memory snapshots.
//!
//! Layers, bottom up (see docs/architecture.md, "The store"):
//!
//! | module | what it is |
//! |---|---|
//! | [`chunk`] | chunk ids (BLAKE3-256 of the plaintext) and the [`chunk::ChunkStore`] trait |
//! | [`crypt`] | encrypted stores: keys, the config's `encryption` section, sealed frames |
//! | [`chunker`] | fixed, page and content-defined chunking, QEMU migration streams |
//! | [`map`] | image maps: Merkle trees of chunk ids over a guest address space, copy-on-write, diffable |
//! | [`pack`], [`index`] | immutable pack files of zstd frames, the chunk index, [`pack::PackStore`] |
//! | [`remote`] | remotes (S3 or a directory): push, pull, a remote snapshot as a chunk store |
//!
//! Everything above `chunk` reaches stored bytes only through [`chunk::ChunkStore`], so the
//! directory store, an object-storage remote and the in-memory store of the tests are
//! interchangeable.

/// Two tests from one body taking `encrypted: bool`: on a plain store and on an encrypted one.
#[cfg(test)]
macro_rules! plain_and_encrypted {
    ($plain:ident, $encrypted:ident, $body:ident) => {
        #[test]
        fn $plain() {
            $body(false);
        }

        #[test]
        fn $encrypted() {
            $body(true);
        }
    };
}

pub mod chunk;
pub mod chunker;
pub mod crypt;
pub mod error;
mod fault;
pub mod index;
pub mod map;
pub mod pack;
pub mod remote;
pub mod store;

pub use chunk::{ChunkId, ChunkStore, MemoryChunkStore};
pub use error::{Error, Result};
