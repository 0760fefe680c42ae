//! [`DiskFrameCache`]: a bounded directory of frames fetched from a remote
//! (`remotes/<name>/cache/frames/`), so that a lazily served disk does not fetch a frame twice
//! across restarts or after the memory cache dropped it.
//!
//! One file per frame, `<pack hex>.<frame>`, holding the frame's header and stored bytes exactly
//! as in the pack. The directory is untrusted like the remote: the caller checks every frame it
//! reads back (header against the frame table, CRC-32C, decompressed length, chunk hashes) and
//! drops a bad one, which is then fetched again. Files are written to a temporary name and
//! renamed, without fsync: a frame lost or cut short by a crash fails its checks and is
//! re-fetched, so no ordering is needed for correctness. A temporary file is locked while it is
//! written, and opening the cache removes only temporaries nobody holds (a crash's leftovers),
//! never those of another process filling the same directory. The bound counts file bytes; the least
//! recently used frames go first, and a frame is admitted only after room was made for it, so
//! the directory never holds more than the bound (plus, transiently, one frame being written).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Result;
use crate::pack::{PackId, create_locked_temp, io_err, remove_stale_temp, temp_path};

#[derive(Debug, Default)]
struct State {
    /// name -> (last use, bytes)
    files: HashMap<String, (u64, u64)>,
    /// last use -> name
    by_use: BTreeMap<u64, String>,
    total: u64,
    tick: u64,
}

impl State {
    fn touch(&mut self, name: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.files.get_mut(name) {
            self.by_use.remove(&e.0);
            e.0 = tick;
            self.by_use.insert(tick, name.to_string());
        }
    }

    fn forget(&mut self, name: &str) -> bool {
        match self.files.remove(name) {
            Some((tick, size)) => {
                self.by_use.remove(&tick);
                self.total -= size;
                true
            }
            None => false,
        }
    }
}

/// A bounded on-disk cache of frames; see the module documentation.
#[derive(Debug)]
pub struct DiskFrameCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// A frame's file name.
fn name_of(pack: &PackId, frame: u32) -> String {
    format!("{}.{frame}", pack.to_hex())
}

fn is_frame_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(p, n)| {
        PackId::from_hex(p).is_some() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The pack a cached frame's file name belongs to, if it is one.
fn pack_of(name: &str) -> Option<PackId> {
    is_frame_name(name)
        .then(|| name.split_once('.').and_then(|(p, _)| PackId::from_hex(p)))
        .flatten()
}

impl DiskFrameCache {
    /// Removes the cached frames of `packs` from the cache directory `dir` (packs a gc deleted
    /// from the remote), without opening the cache.
    pub fn remove_packs(dir: &Path, packs: &std::collections::HashSet<PackId>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if pack_of(&name).is_some_and(|p| packs.contains(&p)) {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
    }

    /// Opens (creating) the cache directory `dir` holding at most `max_bytes`: leftovers of
    /// interrupted writes and files that are not frames are removed, and the oldest frames
    /// beyond the bound.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<DiskFrameCache> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create frame cache"))?;
        let mut found = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(io_err(dir, "list frame cache"))?;
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let meta = ent.metadata().ok();
            match meta {
                Some(m) if m.is_file() && is_frame_name(&name) => {
                    let when = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((when, name, m.len()));
                }
                // A frame being written, by this cache's `put` in another process (or another
                // cache of this one) holds a lock on it: only a crash's leftover goes.
                Some(m) if m.is_file() && name.ends_with(".tmp") => {
                    remove_stale_temp(&ent.path());
                }
                _ => {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        found.sort();
        let cache = DiskFrameCache {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State::default()),
        };
        {
            let mut st = cache.lock();
            for (_, name, size) in found {
                st.tick += 1;
                let tick = st.tick;
                st.files.insert(name.clone(), (tick, size));
                st.by_use.insert(tick, name);
                st.total += size;
            }
            cache.evict(&mut st, 0);
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes least recently used frames until `room` more bytes fit.
    fn evict(&self, st: &mut State, room: u64) {
        while st.total + room > self.max_bytes {
            let Some((_, name)) = st.by_use.pop_first() else {
                break;
            };
            if let Some((_, size)) = st.files.remove(&name) {
                st.total -= size;
            }
            let _ = std::fs::remove_file(self.dir.join(&name));
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().total
    }

    /// The bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The bytes of frame `frame` of `pack` if cached and exactly `len` long (unchecked: the
    /// caller checks them and calls [`DiskFrameCache::drop_frame`] when they are bad).
    pub fn get(&self, pack: &PackId, frame: u32, len: u64) -> Option<Vec<u8>> {
        let name = name_of(pack, frame);
        if !self.lock().files.contains_key(&name) {
            return None;
        }
        let path = self.dir.join(&name);
        let read = std::fs::File::open(&path).and_then(|f| {
            let mut bytes = Vec::new();
            f.take(len + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) if bytes.len() as u64 == len => {
                self.lock().touch(&name);
                Some(bytes)
            }
            _ => {
                self.drop_frame(pack, frame);
                None
            }
        }
    }

    /// Forgets and deletes a frame (found damaged).
    pub fn drop_frame(&self, pack: &PackId, frame: u32) {
        let name = name_of(pack, frame);
        if self.lock().forget(&name) {
            let _ = std::fs::remove_file(self.dir.join(&name));
        }
    }

    /// Stores a frame's bytes (header and stored body). A failed write only loses the copy.
    pub fn put(&self, pack: &PackId, frame: u32, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len > self.max_bytes {
            return;
        }
        let name = name_of(pack, frame);
        {
            let mut st = self.lock();
            if st.files.contains_key(&name) {
                return;
            }
            self.evict(&mut st, len);
            st.tick += 1;
            let tick = st.tick;
            st.files.insert(name.clone(), (tick, len));
            st.by_use.insert(tick, name.clone());
            st.total += len;
        }
        // Locked while written, so that another process opening the cache leaves it alone.
        let tmp = temp_path(&self.dir, "frame");
        let done = create_locked_temp(&tmp, "create cached frame").and_then(|mut f| {
            f.write_all(bytes)
                .and_then(|()| std::fs::rename(&tmp, self.dir.join(&name)))
                .map_err(io_err(&tmp, "write cached frame"))
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
            self.lock().forget(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let dir = image_format::scratch::path("dfc", "bound");
        let p = PackId::from_hex(&"ab".repeat(32)).unwrap();
        let c = DiskFrameCache::open(&dir, 10_000).unwrap();
        for n in 0..5u32 {
            c.put(&p, n, &vec![n as u8; 3000]);
        }
        // 0..5 at 3000 bytes each: only three fit.
        assert!(dir_bytes(&dir) <= 10_000);
        assert_eq!(c.bytes(), 9000);
        assert!(c.get(&p, 0, 3000).is_none());
        assert!(c.get(&p, 1, 3000).is_none());
        // Use 2, then add one more: 3 goes, 2 stays.
        assert_eq!(c.get(&p, 2, 3000).unwrap(), vec![2u8; 3000]);
        c.put(&p, 9, &[9u8; 3000]);
        assert!(c.get(&p, 3, 3000).is_none());
        assert!(c.get(&p, 2, 3000).is_some());
        // A wrong length is a miss, and drops the file.
        assert!(c.get(&p, 4, 2999).is_none());
        assert!(!dir.join(name_of(&p, 4)).exists());
        // Too big for the bound: not kept.
        c.put(&p, 10, &vec![1u8; 20_000]);
        assert!(c.get(&p, 10, 20_000).is_none());
        // Reopened with a smaller bound, with junk in the directory: the junk goes, the bound
        // holds.
        std::fs::write(dir.join("junk"), b"x").unwrap();
        std::fs::write(dir.join(format!("{}.tmp-1", name_of(&p, 7))), b"x").unwrap();
        drop(c);
        let c = DiskFrameCache::open(&dir, 4000).unwrap();
        assert!(c.bytes() <= 4000);
        assert!(dir_bytes(&dir) <= 4000, "{}", dir_bytes(&dir));
        assert!(!dir.join("junk").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_frames_of_removed_packs_go_and_the_others_stay() {
        let dir = image_format::scratch::path("dfc", "remove");
        let (a, b) = (
            PackId::from_hex(&"ab".repeat(32)).unwrap(),
            PackId::from_hex(&"cd".repeat(32)).unwrap(),
        );
        let c = DiskFrameCache::open(&dir, 1 << 20).unwrap();
        for n in 0..3u32 {
            c.put(&a, n, &[1; 100]);
            c.put(&b, n, &[2; 100]);
        }
        std::fs::write(dir.join(format!("{}.tmp-1", name_of(&a, 7))), b"x").unwrap();
        DiskFrameCache::remove_packs(&dir, &[a].into_iter().collect());
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = (0..3).map(|n| name_of(&b, n)).collect();
        // Not a frame: left for the cache's own open to sort out.
        want.push(format!("{}.tmp-1", name_of(&a, 7)));
        want.sort();
        assert_eq!(left, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn opening_removes_abandoned_temporaries_and_leaves_those_being_written() {
        let dir = image_format::scratch::path("dfc", "temps");
        let p = PackId::from_hex(&"ef".repeat(32)).unwrap();
        let first = DiskFrameCache::open(&dir, 1 << 20).unwrap();
        first.put(&p, 0, &[5; 100]);
        // A frame another opener is writing (its lock held), and one a crash abandoned.
        let busy = temp_path(&dir, "frame");
        let held = create_locked_temp(&busy, "create").unwrap();
        let stale = temp_path(&dir, "frame");
        drop(create_locked_temp(&stale, "create").unwrap());
        std::fs::write(dir.join("stranger"), b"x").unwrap();
        let second = DiskFrameCache::open(&dir, 1 << 20).unwrap();
        assert!(busy.exists(), "a temporary being written was removed");
        assert!(!stale.exists(), "an abandoned temporary stayed");
        assert!(!dir.join("stranger").exists());
        // Both openers see the frame the first wrote; the second writes one the first can
        // read, through the same kind of locked temporary.
        assert_eq!(second.get(&p, 0, 100).unwrap(), vec![5; 100]);
        second.put(&p, 1, &[6; 50]);
        assert_eq!(
            std::fs::read(dir.join(name_of(&p, 1))).unwrap(),
            vec![6; 50]
        );
        // Once its writer is gone, the temporary is a leftover like any other.
        drop(held);
        drop(DiskFrameCache::open(&dir, 1 << 20).unwrap());
        assert!(!busy.exists());
        let left = std::fs::read_dir(&dir).unwrap().flatten().count();
        assert_eq!(left, 2, "only the two frames are left");
        drop((first, second));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
