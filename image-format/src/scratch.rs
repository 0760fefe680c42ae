//! Scratch directories for the workspace's unit tests: one fresh path per call, named after the
//! process, and a sweep (once per process) of the directories that test processes which are no
//! longer running left behind (a failed or killed test never cleans up after itself).

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// What every scratch directory's name starts with (older names, swept too, follow it).
const PREFIX: &str = "vmnest-unit-";
const OLD_PREFIXES: [&str; 5] = [
    "vmnest-pack-test-",
    "vmnest-store-",
    "vmnest-registry-",
    "vmnest-volume-",
    "vmnest-vmdk-unit-",
];

/// A fresh path (nothing there yet) for a scratch directory of test `name` in area `kind`.
pub fn path(kind: &str, name: &str) -> PathBuf {
    static SWEEP: Once = Once::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = std::env::temp_dir();
    SWEEP.call_once(|| sweep(&tmp));
    let dir = tmp.join(format!(
        "{PREFIX}{}-{kind}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The pid in a scratch directory's name, if it is one.
fn owner(name: &str) -> Option<u32> {
    let rest = std::iter::once(PREFIX)
        .chain(OLD_PREFIXES)
        .find_map(|p| name.strip_prefix(p))?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// Removes the scratch directories in `tmp` whose process is gone.
fn sweep(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(owner) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_their_owner_and_others_are_left_alone() {
        assert_eq!(owner("vmnest-unit-123-store-x-0"), Some(123));
        assert_eq!(owner("vmnest-pack-test-77-a-1"), Some(77));
        assert_eq!(owner("vmnest-store-9-gc"), Some(9));
        assert_eq!(owner("vmnest-store-x"), None);
        assert_eq!(owner("bash_jobs.0"), None);
        let a = path("scratch", "t");
        let b = path("scratch", "t");
        assert_ne!(a, b);
        assert!(!a.exists());
    }

    #[test]
    fn directories_of_finished_processes_are_swept() {
        let tmp = path("scratch", "sweep");
        // A pid above the kernel's maximum (4194304) is never running.
        let gone = tmp.join("vmnest-unit-4999999-store-x-0");
        let mine = tmp.join(format!("vmnest-unit-{}-store-x-0", std::process::id()));
        let other = tmp.join("unrelated-4999999");
        for d in [&gone, &mine, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        sweep(&tmp);
        assert!(!gone.exists());
        assert!(mine.exists() && other.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
