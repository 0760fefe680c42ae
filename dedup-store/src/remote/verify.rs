//! `verify --remote`: checks that every manifest on a remote refers only to chunks and map nodes
//! that are in packs the remote holds (listed, with the length their index object gives), and
//! that every ref names a manifest there. Map nodes are fetched and checked (checksums,
//! hashes); data chunks are checked for presence, not read.
//!
//! An encrypted remote is verified without its key unless [`Remote::set_keys`] gave it: map
//! nodes sit in unsealed frames and are walked (checksums checked; their keyed ids cannot be
//! checked without the key, which the report says), recipe parts are sealed and checked for
//! presence only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::chunk::ChunkId;
use crate::error::Result;
use crate::pack::PackId;
use crate::remote::chunks::REMOTE_FRAME_CACHE;
use crate::remote::{Remote, RemoteChunks, RemoteReadOptions};
use crate::store::verify::check_member;
use crate::store::{Layout, Member};

/// What `verify --remote` found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RemoteVerifyReport {
    /// Manifests checked.
    pub snapshots: usize,
    /// Refs checked.
    pub refs: usize,
    /// Packs with an index object.
    pub packs: usize,
    /// Chunks in those packs.
    pub chunks: usize,
    /// Refs naming a manifest the remote does not hold.
    pub dangling_refs: Vec<String>,
    /// Snapshots (`name@id`) that refer to something missing or damaged, and what.
    pub affected: BTreeMap<String, Vec<String>>,
    /// The remote is encrypted (it has a `keys` object).
    pub encrypted: bool,
    /// Whether the ids of what was read were checked (false: an encrypted remote verified
    /// without its key; map nodes were walked, their keyed ids not checked).
    pub ids_checked: bool,
}

impl RemoteVerifyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.dangling_refs.is_empty() && self.affected.is_empty()
    }
}

/// A reader of `remote` for walking its maps: without checking ids when `keyless` (an encrypted
/// remote read without its key: map nodes are not sealed, but their ids are keyed).
pub(crate) fn keyless_reader(remote: &Arc<Remote>, keyless: bool) -> Result<RemoteChunks> {
    RemoteChunks::with_options(
        remote.clone(),
        RemoteReadOptions {
            memory_cache: REMOTE_FRAME_CACHE,
            check_ids: !keyless,
            ..Default::default()
        },
    )
}

/// Verifies `remote`; see the module documentation.
pub fn verify_remote(remote: &Arc<Remote>) -> Result<RemoteVerifyReport> {
    remote.refresh_index()?;
    let encrypted = remote.encryption()?.is_some();
    let keyless = encrypted && remote.keys().is_none();
    let mut report = RemoteVerifyReport {
        packs: remote.indexed_packs().len(),
        chunks: remote.chunk_count(),
        encrypted,
        ids_checked: !keyless,
        ..Default::default()
    };
    let listed: HashMap<PackId, u64> = remote
        .block_on(remote.list("packs"))?
        .into_iter()
        .filter_map(|(f, size)| Some((f.strip_suffix(".pack").and_then(PackId::from_hex)?, size)))
        .collect();
    let rc = keyless_reader(remote, keyless)?;
    let snapshots = remote.snapshots()?;
    let mut ids: Vec<_> = snapshots.iter().copied().collect();
    ids.sort();
    for sid in ids {
        report.snapshots += 1;
        let mut problems = BTreeSet::new();
        let label;
        match remote.manifest(&sid) {
            Ok(Some((_, m))) => {
                label = format!("{}@{}", m.name, sid.short());
                let need = |id: &ChunkId, problems: &mut BTreeSet<String>, what: &str| match remote
                    .locate(id)
                {
                    None => {
                        problems.insert(format!("{what}: missing chunk {id}"));
                    }
                    Some((p, _, info)) if listed.get(&p) != Some(&info.len) => {
                        problems.insert(format!(
                            "{what}: chunk {id} is in pack {p}, which is missing or cut short"
                        ));
                    }
                    Some(_) => {}
                };
                for member in &m.members {
                    walk_remote_member(&rc, member, &mut HashSet::new(), &mut problems, &need)?;
                }
            }
            Ok(None) => continue,
            Err(e) => {
                label = format!("@{}", sid.short());
                problems.insert(e.to_string());
            }
        }
        if !problems.is_empty() {
            report
                .affected
                .insert(label, problems.into_iter().collect());
        }
    }
    for (name, id) in remote.refs()? {
        report.refs += 1;
        if !snapshots.contains(&id) {
            report
                .dangling_refs
                .push(format!("{name} -> {}", id.to_hex()));
        }
    }
    Ok(report)
}

/// Walks what `member` of a manifest on the remote refers to: map nodes and recipe parts are
/// fetched through `rc` and checked, subtrees whose id is in `seen` are not entered again, and
/// `need(id, problems, member name)` is called for every id met. The one walk of remote maps,
/// shared by `verify --remote` (a fresh `seen` per member) and `gc --remote` (one `seen` for
/// the whole marking).
pub(crate) fn walk_remote_member(
    rc: &RemoteChunks,
    member: &Member,
    seen: &mut HashSet<ChunkId>,
    problems: &mut BTreeSet<String>,
    need: &dyn Fn(&ChunkId, &mut BTreeSet<String>, &str),
) -> Result<()> {
    match &member.layout {
        // An encrypted remote read without its key: recipe parts are sealed, so they are
        // checked for presence and what they refer to is unknown (gc --remote refuses that case).
        Layout::Recipe { parts, .. } if !rc.checks_ids() => {
            for part in parts {
                if seen.insert(*part) {
                    need(part, problems, &member.name);
                }
            }
            Ok(())
        }
        _ => check_member(rc, member, seen, problems, need),
    }
}
