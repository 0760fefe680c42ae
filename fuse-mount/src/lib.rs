//! Exports over any `BlockDevice`: the NBD server ([`nbd`]); the FUSE filesystem comes later
//! (issue 5).
//!
//! This crate sees only the traits of `image-format`: it never names a format or the store, so
//! whatever implements `BlockDevice` (an image file, a stored snapshot) can be exported.

pub mod nbd;
pub mod partition;
