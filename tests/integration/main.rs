//! The integration suite: one binary, one module per area. Peers (qemu-img, libyal's readers)
//! are oracles; a missing peer fails the test.

mod cli;
mod conformance;
mod convert;
mod parallels;
mod qcow2;
mod raw;
mod vhd;
mod vhdx;
mod vmdk;
mod vmdk_write;
