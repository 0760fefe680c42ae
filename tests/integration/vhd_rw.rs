//! In-place writes to existing fixed and dynamic VHD images, checked against a shadow model:
//! `qemu-img compare` and our reader must agree with it, `vmnest check` must be clean, and the
//! file must still end with a valid footer. Differencing disks are refused writable.

use std::path::Path;
use std::sync::Arc;

use image_format::OpenOptions;
use vmnest_tests::*;

use super::qcow2_rw::{Layout, open_rw, random_ops};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn verify(dir: &Path, img: &Path, model: &[u8], name: &str) {
    let raw = dir.join(format!("{name}.model.raw"));
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "vpc", s(&raw), s(img)]);
    let want = blake3::hash(model).to_hex().to_string();
    assert_eq!(hash_device(open(img).as_ref()), want, "{name}: our reader");
    let out = run(vmnest().args(["check", s(img)]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{name}: vmnest check: {text}");
    let bytes = std::fs::read(img).unwrap();
    assert_eq!(
        &bytes[bytes.len() - 512..bytes.len() - 504],
        b"conectix",
        "{name}: no footer at the end"
    );
    std::fs::remove_file(&raw).unwrap();
}

#[test]
fn random_writes_to_fixed_and_dynamic_vhds_land() {
    let dir = scratch("vhd-rw");
    let raw = dir.join("base.raw");
    write_pattern_raw(&raw, 12 << 20, 51);
    let base = read_raw(&raw);
    for (name, subformat, seed) in [("dynamic", "dynamic", 5u64), ("fixed", "fixed", 6)] {
        let img = dir.join(format!("{name}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            &format!("subformat={subformat},force_size=on"),
            s(&raw),
            s(&img),
        ]);
        let len_before = std::fs::metadata(&img).unwrap().len();
        let mut model = base.clone();
        let layout = Layout {
            cluster: 4096,
            discard_unit: Some(1),
        };
        {
            let dev = open_rw(&img);
            assert_eq!(dev.size(), model.len() as u64, "{name}");
            // Blocks of 2 MiB: several stay unallocated in the pattern and get allocated now,
            // some by threads racing for the same block.
            std::thread::scope(|scope| {
                for t in 0..4u64 {
                    let dev = Arc::clone(&dev);
                    scope.spawn(move || {
                        for b in 0..6u64 {
                            let off = b * (2 << 20) + t * 8192 + 100;
                            let mut buf = vec![0u8; 5000];
                            pattern_bytes(&mut buf, off, t);
                            dev.write_at(&buf, off).unwrap();
                        }
                    });
                }
            });
            for t in 0..4u64 {
                for b in 0..6u64 {
                    let off = (b * (2 << 20) + t * 8192 + 100) as usize;
                    pattern_bytes(&mut model[off..off + 5000], off as u64, t);
                }
            }
            random_ops(dev.as_ref(), &mut model, layout, seed, 300);
        }
        verify(&dir, &img, &model, name);
        let len_after = std::fs::metadata(&img).unwrap().len();
        if name == "dynamic" {
            // qemu left the pattern's empty 2 MiB blocks unallocated; the writes allocated them.
            assert!(len_after > len_before, "{len_before} -> {len_after}");
        } else {
            assert_eq!(len_after, len_before);
        }
    }
}

#[test]
fn differencing_vhds_are_refused_writable_by_name() {
    use super::vhd::{MARKED, make_parent, parent_facts, write_child};
    let dir = scratch("vhd-rw-diff");
    let parent = make_parent(&dir);
    let facts = parent_facts(&parent);
    let child = dir.join("child.vhd");
    write_child(&child, &facts, facts.unique_id, 0, &MARKED);
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let err = image_format::open(&child, &options).err().expect("refused");
    assert!(err.to_string().contains("differencing"), "{err}");
    // `vmnest serve --rw` refuses it before opening it writable.
    let before = std::fs::read(&child).unwrap();
    let out = run(vmnest().args(["serve", "--rw", s(&child)]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be served writable"), "{err}");
    assert_eq!(std::fs::read(&child).unwrap(), before);
}
