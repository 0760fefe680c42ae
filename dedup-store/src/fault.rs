//! Fault injection for the store's write path (tests only): every write, fsync, rename and link
//! of the store passes through [`check`], which a test can make fail at the N-th operation; the
//! files written since their last fsync are recorded so a test can then drop what was not
//! synced, as a power cut would. In other builds [`check`] does nothing.

use std::path::Path;

/// One operation of the write path: `op` is "write", "sync", "rename" or "link".
#[cfg(test)]
pub(crate) fn check(op: &'static str, path: &Path) -> std::io::Result<()> {
    plan::PLAN.with(|p| {
        let mut p = p.borrow_mut();
        let Some(plan) = p.as_mut() else {
            return Ok(());
        };
        plan.ops += 1;
        if plan.fail_at.is_some_and(|n| plan.ops >= n) {
            return Err(std::io::Error::other(format!(
                "injected fault at {op} #{} of {}",
                plan.ops,
                path.display()
            )));
        }
        match op {
            "write" => {
                // What a file held before its first write since arming counts as synced.
                if !plan.synced_len.contains_key(path)
                    && let Ok(meta) = std::fs::metadata(path)
                {
                    plan.synced_len.insert(path.to_path_buf(), meta.len());
                }
                plan.unsynced.insert(path.to_path_buf());
            }
            "sync" => {
                plan.unsynced.remove(path);
                if let Ok(meta) = std::fs::metadata(path)
                    && meta.is_file()
                {
                    plan.synced_len.insert(path.to_path_buf(), meta.len());
                }
            }
            _ => {}
        }
        Ok(())
    })
}

/// One operation of the write path (no faults outside tests).
#[cfg(not(test))]
#[inline]
pub(crate) fn check(_op: &'static str, _path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
pub(crate) mod plan {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    /// The faults of the current thread.
    #[derive(Debug, Default)]
    pub struct FaultPlan {
        /// Operations seen so far.
        pub ops: u64,
        /// Fail the operation with this number (1-based), and every one after it.
        pub fail_at: Option<u64>,
        /// Files written and not yet fsynced.
        pub unsynced: BTreeSet<PathBuf>,
        /// The length of each file at its last fsync (what an append-only file keeps after a
        /// power cut).
        pub synced_len: BTreeMap<PathBuf, u64>,
    }

    thread_local! {
        pub static PLAN: RefCell<Option<FaultPlan>> = const { RefCell::new(None) };
    }

    /// Starts recording (and failing from operation `fail_at`) on this thread.
    pub fn arm(fail_at: Option<u64>) {
        PLAN.with(|p| {
            *p.borrow_mut() = Some(FaultPlan {
                fail_at,
                ..Default::default()
            })
        });
    }

    /// Stops; returns what was recorded.
    pub fn disarm() -> FaultPlan {
        PLAN.with(|p| p.borrow_mut().take()).unwrap_or_default()
    }
}
