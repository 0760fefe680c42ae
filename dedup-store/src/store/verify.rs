//! Verify: re-read every pack, re-hash every chunk, and name the snapshots a damaged or missing
//! chunk touches.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::Result;
use crate::map::walk;
use crate::store::gc::live_snapshots;
use crate::store::{Layout, Member, Store};

/// What verify found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Packs read.
    pub packs: usize,
    /// Chunks whose BLAKE3 matched their id.
    pub chunks_ok: u64,
    /// Plaintext bytes checked.
    pub bytes: u64,
    /// Damaged chunks: id and what was wrong (pack, frame).
    pub damaged: Vec<(String, String)>,
    /// Packs that could not be read at all, and why.
    pub damaged_packs: Vec<(String, String)>,
    /// Snapshots checked (every snapshot a name reaches).
    pub snapshots: usize,
    /// Snapshots that need a chunk that is damaged or missing: `name@id` -> problems.
    pub affected: BTreeMap<String, Vec<String>>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.damaged_packs.is_empty() && self.affected.is_empty()
    }
}

/// Walks everything `member` refers to in `store` (map nodes and parts are read from it; a
/// subtree or part whose id is in `seen` is not entered again, and every id entered is added),
/// calling `need(id, problems, member name)` for every id; what cannot be read goes to
/// `problems`. Shared by the store's verify, `verify --remote` and `gc --remote`.
pub(crate) fn check_member<S: ChunkStore + ?Sized>(
    store: &S,
    member: &Member,
    seen: &mut HashSet<ChunkId>,
    problems: &mut BTreeSet<String>,
    need: &dyn Fn(&ChunkId, &mut BTreeSet<String>, &str),
) -> Result<()> {
    match &member.layout {
        Layout::Map { .. } => {
            let Some(root) = member.map_root() else {
                return Ok(());
            };
            let mut errors = Vec::new();
            walk(
                store,
                &root,
                &mut |id, _| {
                    need(id, problems, &member.name);
                    seen.insert(*id)
                },
                &mut |id, e| errors.push(format!("{}: map node {id}: {e}", member.name)),
            )?;
            problems.extend(errors);
        }
        Layout::Recipe { parts, .. } => {
            for part in parts {
                need(part, problems, &member.name);
                if !seen.insert(*part) {
                    continue;
                }
                match crate::store::stream::part_chunks(store, part) {
                    Ok(ids) => {
                        for id in ids {
                            need(&id, problems, &member.name);
                        }
                    }
                    Err(e) => {
                        problems.insert(format!("{}: recipe part {part}: {e}", member.name));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Verifies the store; see the module documentation.
pub fn verify(store: &Store) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    for (path, why) in &store.report().damaged_packs {
        report
            .damaged_packs
            .push((path.display().to_string(), why.clone()));
    }
    let hasher = store.chunks().id_hasher();
    let mut good: HashSet<ChunkId> = HashSet::new();
    let mut bad: HashSet<ChunkId> = HashSet::new();
    for pack in store.chunks().packs() {
        report.packs += 1;
        let frames = pack.frames().len();
        let mut decoded = Vec::with_capacity(frames);
        for f in 0..frames {
            decoded.push(pack.frame(f as u32, None));
        }
        for e in pack.entries() {
            let problem = match decoded.get(e.loc.frame as usize) {
                Some(Ok(plain)) => {
                    let start = e.loc.offset as usize;
                    match plain.get(start..start + e.loc.len as usize) {
                        Some(data) if hasher.id(data) == e.id => None,
                        Some(_) => Some("its bytes do not hash to its id".to_string()),
                        None => Some("it runs past its frame".to_string()),
                    }
                }
                Some(Err(err)) => Some(err.to_string()),
                None => Some(format!("frame {} is not in the pack", e.loc.frame)),
            };
            match problem {
                None => {
                    report.chunks_ok += 1;
                    report.bytes += u64::from(e.loc.len);
                    good.insert(e.id);
                }
                Some(why) => {
                    bad.insert(e.id);
                    report.damaged.push((
                        e.id.to_hex(),
                        format!("pack {} frame {}: {why}", pack.id(), e.loc.frame),
                    ));
                }
            }
        }
    }
    // A chunk stored twice, once damaged, is still readable: it is not a problem.
    report
        .damaged
        .retain(|(id, _)| ChunkId::from_hex(id).is_none_or(|id| !good.contains(&id)));
    let live = live_snapshots(store)?;
    report.snapshots = live.len();
    let names: BTreeMap<_, _> = store.refs()?.into_iter().map(|(n, id)| (id, n)).collect();
    for (sid, m) in &live {
        let label = format!(
            "{}@{}",
            names.get(sid).cloned().unwrap_or_else(|| m.name.clone()),
            sid.short()
        );
        let mut problems = BTreeSet::new();
        let need = |id: &ChunkId, problems: &mut BTreeSet<String>, what: &str| {
            if !good.contains(id) {
                let state = if bad.contains(id) {
                    "damaged"
                } else {
                    "missing"
                };
                problems.insert(format!("{what}: {state} chunk {id}"));
            }
        };
        for member in &m.members {
            check_member(
                store.chunks().as_ref(),
                member,
                &mut HashSet::new(),
                &mut problems,
                &need,
            )?;
        }
        if !problems.is_empty() {
            report
                .affected
                .insert(label, problems.into_iter().collect());
        }
    }
    Ok(report)
}
