//! Heavy (ignored by default; `VMNEST_HEAVY=1 scripts/test.sh` runs it): qemu-system-x86_64
//! under TCG boots a Debian disk served from the store over NBD to a login prompt on its serial
//! console, writing to a copy-on-write volume that is then committed as a new snapshot. The
//! work is bench/boot.sh's (which also builds the disk with debootstrap when
//! bench/work/linux.raw is missing, and unpacks qemu-system privately); this test runs it on the
//! freshly built binary and fails when it does.

use std::path::Path;
use std::process::Command;

use vmnest_tests::vmnest;

#[test]
#[ignore = "heavy: boots a VM under TCG (minutes); run with VMNEST_HEAVY=1 scripts/test.sh"]
fn qemu_boots_a_stored_linux_disk_over_nbd() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let bin = vmnest().get_program().to_owned();
    let out = Command::new("bash")
        .arg(repo.join("bench/boot.sh"))
        .args(["--rw", "--only", "vmnest"])
        .env("VMNEST", &bin)
        .output()
        .expect("run bench/boot.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench/boot.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("login prompt after"), "{stdout}\n{stderr}");
    // The guest wrote to its writable volume, and the commit kept it as a new snapshot.
    assert!(stdout.contains("the boot changed"), "{stdout}\n{stderr}");
}
