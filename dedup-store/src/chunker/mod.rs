//! Chunkers: pure functions that cut bytes into chunks, with no store access.
//!
//! | module | for |
//! |---|---|
//! | [`fixed`] | disks (aligned fixed-size chunks of the guest address space) and page-aligned memory images (4 KiB pages); all-zero chunks reported as holes |
//! | [`cdc`] | byte streams that are not page-aligned (content-defined chunking, gear hash) |
//! | [`qemu_migration`] | QEMU migration streams: RAM pages split out of the stream so they dedupe like memory images, the rest left to CDC |

pub mod cdc;
pub mod fixed;
pub mod qemu_migration;
