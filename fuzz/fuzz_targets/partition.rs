//! Fuzz the partition table parser (fuse-mount `partition`): the input is a disk. The first two
//! bytes may declare the disk larger than the input (reads past the input return zeros), so
//! tables that point far away are reached too. Errors are expected; a panic, a partition outside
//! the disk, a repeated number or an unbounded list is a finding.
#![no_main]

use fuse_mount::partition::{self, MAX_LOGICAL};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, shift], disk)) = data.split_first_chunk::<2>() else {
        return;
    };
    let size = if mode & 1 == 1 {
        (disk.len() as u64) << (shift % 40)
    } else {
        disk.len() as u64
    };
    let result = partition::parse("fuzz", size, |off, buf| {
        assert!(off + buf.len() as u64 <= size, "read past the disk");
        assert!(buf.len() <= partition::MAX_GPT_ARRAY as usize, "read too large");
        buf.fill(0);
        if let Some(have) = disk.get(off as usize..) {
            let n = have.len().min(buf.len());
            buf[..n].copy_from_slice(&have[..n]);
        }
        Ok(())
    });
    if let Ok(Some(table)) = result {
        let mut numbers = std::collections::HashSet::new();
        for p in &table.partitions {
            assert!(p.len > 0);
            assert!(p.offset.checked_add(p.len).is_some_and(|end| end <= size));
            assert!(numbers.insert(p.number), "number {} twice", p.number);
        }
        assert!(table.partitions.len() <= 4 + MAX_LOGICAL + 8192);
        assert!(table.warnings.len() <= 8192 + MAX_LOGICAL + 8);
    }
});
