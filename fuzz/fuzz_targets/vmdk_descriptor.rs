//! Arbitrary bytes fed to the VMDK text descriptor parser and prober directly.
#![no_main]

use image_format::vmdk::descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = descriptor::probe_text(data);
    if let Ok(d) = descriptor::parse(data, 0) {
        let _ = d.total_sectors();
        let _ = d.has_parent();
        let _ = d.ddb("ddb.adapterType");
    }
});
