//! The integration suite: one binary, one module per area. Peers (qemu-img, libyal's readers)
//! are oracles; a missing peer fails the test.

/// Two tests running `$body(encrypted)`: on a plain store and on an encrypted one.
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
