//! The integration suite: one binary, one module per area. Peers (qemu-img, libyal's readers)
//! are oracles; a missing peer fails the test.

mod boot;
mod cli;
mod conformance;
mod convert;
mod mount;
mod nbd;
mod parallels;
mod qcow2;
mod qcow2_rw;
mod qcow2_write;
mod raw;
mod remote;
mod remote_crypt;
mod remote_gc;
mod serve_from;
mod store;
mod vhd;
mod vhd_rw;
mod vhd_write;
mod vhdx;
mod vhdx_write;
mod vmdk;
mod vmdk_write;
mod volume;
