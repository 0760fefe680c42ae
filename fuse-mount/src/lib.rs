//! Exports over any `BlockDevice`: the NBD server ([`nbd`]) and the FUSE filesystem ([`fuse`]),
//! which shows disks and their partitions ([`partition`]) as files.
//!
//! This crate sees only the traits of `image-format`: it never names a format or the store, so
//! whatever implements `BlockDevice` (an image file, a stored snapshot) can be exported.

pub mod fuse;
pub mod nbd;
pub mod partition;
