//! Exports over any `BlockDevice`: the NBD server and the FUSE filesystem (issue 5; empty for now).
