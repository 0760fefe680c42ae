//! gc --remote and rm --remote against a directory remote.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::chunker::cdc::xorshift_bytes;
use crate::remote::{PushOptions, add_remote, pull, push, verify_remote};
use crate::store::Store;
use crate::store::tests::{commit_disk, read_all, tmp};

fn remote_at(store: &Store, dir: &Path) -> Arc<Remote> {
    let _ = add_remote(store.root(), "r", &dir.display().to_string());
    Arc::new(Remote::open(store.root(), "r").unwrap())
}

/// Object names under `dir/` of the remote directory.
fn objects(remote_dir: &Path, dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(remote_dir.join(dir))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn everything(remote_dir: &Path) -> BTreeSet<String> {
    ["packs", "index", "snapshots", "refs", "gc"]
        .iter()
        .flat_map(|d| {
            objects(remote_dir, d)
                .into_iter()
                .map(move |n| format!("{d}/{n}"))
        })
        .collect()
}

fn gc(remote: &Arc<Remote>, grace: Duration) -> RemoteGcReport {
    gc_remote(
        remote,
        RemoteGcOptions {
            grace,
            dry_run: false,
        },
    )
    .unwrap()
}

/// Lets the remote's clock pass the slack kept for whole-second LastModified times.
fn past_slack() {
    std::thread::sleep(Duration::from_millis(CLOCK_SLACK_MS as u64 + 100));
}

fn push_names(src: &Store, remote: &Remote, names: &[&str]) -> crate::remote::PushReport {
    let targets: Vec<_> = names
        .iter()
        .map(|n| (n.to_string(), src.head(n).unwrap().unwrap(), true))
        .collect();
    push(src, remote, &targets, &PushOptions::default()).unwrap()
}

/// gold (4 MiB) and a clone of it with 512 KiB changed (its own pack).
fn gold_and_clone(src: &Store) -> (Vec<u8>, Vec<u8>) {
    let gold = xorshift_bytes(21, 4 << 20);
    commit_disk(src, "gold", &gold);
    let mut clone = gold.clone();
    clone[1 << 20..(1 << 20) + (512 << 10)].copy_from_slice(&xorshift_bytes(22, 512 << 10));
    commit_disk(src, "clone", &clone);
    (gold, clone)
}

/// The remote verifies, and `name` pulled into an empty store reads as `want`.
fn whole_again(remote: &Arc<Remote>, dir: &Path, rdir: &Path, name: &str, want: &[u8]) {
    assert!(verify_remote(remote).unwrap().is_clean());
    let dst =
        Arc::new(Store::create(&dir.join(format!("dst-{name}")), Default::default()).unwrap());
    let remote2 = remote_at(&dst, rdir);
    pull(&dst, &remote2, name).unwrap();
    assert_eq!(read_all(&dst, name), want);
}

/// A source store with gold and a clone, and a directory remote `r` (empty).
struct Source {
    dir: std::path::PathBuf,
    src: Store,
    rdir: std::path::PathBuf,
    remote: Arc<Remote>,
    gold: Vec<u8>,
    clone: Vec<u8>,
}

fn source(name: &str) -> Source {
    let dir = tmp(name);
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    let (gold, clone) = gold_and_clone(&src);
    let rdir = dir.join("remote");
    let remote = remote_at(&src, &rdir);
    Source {
        dir,
        src,
        rdir,
        remote,
        gold,
        clone,
    }
}

/// [`source`] with gold pushed, then the clone; and gold's packs on the remote.
fn both_pushed(name: &str) -> (Source, BTreeSet<String>) {
    let source = source(name);
    push_names(&source.src, &source.remote, &["gold"]);
    let gold_packs = objects(&source.rdir, "packs");
    push_names(&source.src, &source.remote, &["clone"]);
    (source, gold_packs)
}

/// [`source`] with gold pushed, then its name removed there, and the remote's clock past the
/// slack; and gold's packs on the remote.
fn nameless_gold(name: &str) -> (Source, BTreeSet<String>) {
    let source = source(name);
    push_names(&source.src, &source.remote, &["gold"]);
    let gold_packs = objects(&source.rdir, "packs");
    remove_refs(&source.remote, &["gold".into()]).unwrap();
    past_slack();
    (source, gold_packs)
}

#[test]
fn gc_after_rm_deletes_only_what_the_clone_needed_in_two_runs() {
    let (
        Source {
            dir,
            rdir,
            remote,
            gold,
            src,
            ..
        },
        gold_packs,
    ) = both_pushed("rgc-two-runs");
    let all_packs = objects(&rdir, "packs");
    let clone_only: BTreeSet<String> = all_packs.difference(&gold_packs).cloned().collect();
    assert_eq!(clone_only.len(), 1, "{all_packs:?}");
    let clone_snap = src.head("clone").unwrap().unwrap().to_hex();

    // Unknown names are refused, and nothing is removed.
    assert!(remove_refs(&remote, &["clone".into(), "nope".into()]).is_err());
    assert_eq!(objects(&rdir, "refs").len(), 2);
    let removed = remove_refs(&remote, &["clone".into()]).unwrap();
    assert_eq!(removed[0].0, "clone");
    assert_eq!(objects(&rdir, "refs"), BTreeSet::from(["gold".to_string()]));
    // The clone's manifest gets older than the grace (2 s here).
    let grace = Duration::from_secs(2);
    let wait = || std::thread::sleep(grace + Duration::from_millis(CLOCK_SLACK_MS as u64 + 200));
    wait();

    // First run: condemns the clone's pack and manifest, deletes nothing.
    let before = everything(&rdir);
    let r1 = gc(&remote, grace);
    assert_eq!(r1.packs_condemned, 1, "{r1:?}");
    assert_eq!(r1.manifests_condemned.len(), 1, "{r1:?}");
    assert!(r1.manifests_condemned[0].starts_with("clone@"), "{r1:?}");
    assert_eq!(
        (r1.packs_deleted, r1.manifests_deleted.len()),
        (0, 0),
        "{r1:?}"
    );
    let after: BTreeSet<String> = everything(&rdir)
        .into_iter()
        .filter(|n| !n.starts_with("gc/"))
        .collect();
    assert_eq!(after, before);
    assert_eq!(objects(&rdir, "gc").len(), 1);

    // Within the grace of the condemnation: nothing goes.
    let r2 = gc(&remote, grace);
    assert_eq!((r2.packs_deleted, r2.packs_pending), (0, 1), "{r2:?}");
    assert!(r2.manifests_deleted.is_empty());
    assert_eq!(objects(&rdir, "packs"), all_packs);
    wait();

    // A dry run past the grace says what would go and changes nothing.
    let before = everything(&rdir);
    let dry = gc_remote(
        &remote,
        RemoteGcOptions {
            grace,
            dry_run: true,
        },
    )
    .unwrap();
    assert_eq!(
        (dry.packs_deleted, dry.manifests_deleted.len()),
        (1, 1),
        "{dry:?}"
    );
    assert!(dry.bytes_freed > 512 << 10, "{dry:?}");
    assert_eq!(everything(&rdir), before);

    // Past the grace: exactly the clone's pack and manifest go, and the record.
    let r3 = gc(&remote, grace);
    assert_eq!(
        (r3.packs_deleted, r3.manifests_deleted.len()),
        (1, 1),
        "{r3:?}"
    );
    assert_eq!(r3.records_deleted, 1, "{r3:?}");
    assert_eq!(objects(&rdir, "packs"), gold_packs);
    assert!(!objects(&rdir, "snapshots").contains(&clone_snap));
    assert!(objects(&rdir, "gc").is_empty());
    // The local copies of the index objects follow.
    let cached = objects(remote.cache_dir(), "index");
    assert_eq!(cached.len(), gold_packs.len(), "{cached:?}");
    // Gold reads back whole in an empty store.
    whole_again(&remote, &dir, &rdir, "gold", &gold);

    // Nothing more to do.
    let r4 = gc(&remote, Duration::ZERO);
    assert_eq!(
        (r4.packs_condemned, r4.packs_deleted, r4.records_written),
        (0, 0, 0),
        "{r4:?}"
    );
}

#[test]
fn a_manifest_younger_than_the_grace_survives_without_a_ref() {
    let Source {
        src, rdir, remote, ..
    } = source("rgc-young");
    push_names(&src, &remote, &["gold", "clone"]);
    remove_refs(&remote, &["clone".into()]).unwrap();
    let before = everything(&rdir);
    let r = gc(&remote, Duration::from_secs(600));
    assert_eq!(r.roots, 2, "{r:?}");
    assert_eq!(r.live_snapshots, 2, "{r:?}");
    assert_eq!(
        (r.packs_condemned, r.manifests_condemned.len()),
        (0, 0),
        "{r:?}"
    );
    assert_eq!(everything(&rdir), before);
    assert!(verify_remote(&remote).unwrap().is_clean());
}

#[test]
fn a_push_that_relied_on_a_pack_condemned_meanwhile_uploads_it_again() {
    let (t, gold_packs) = nameless_gold("rgc-race");
    let (dir, src, rdir, remote) = (t.dir, t.src, t.rdir, t.remote);

    // The clone's push finds most of its chunks in gold's pack; a gc condemns that pack (gold
    // has no name now) after the push planned and before it commits.
    let gc_remote_handle = Arc::new(Remote::open(src.root(), "r").unwrap());
    let runs = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let (h, runs) = (gc_remote_handle.clone(), runs.clone());
        Arc::new(move || {
            let mut runs = runs.lock().unwrap();
            if runs.is_empty() {
                runs.push(gc(&h, Duration::ZERO));
            }
        })
    };
    let opts = PushOptions {
        before_commit: Some(hook),
        ..Default::default()
    };
    let id = src.head("clone").unwrap().unwrap();
    let r = push(&src, &remote, &[("clone".into(), id, true)], &opts).unwrap();
    let first = runs.lock().unwrap()[0].clone();
    // Gold's packs (and, if it is older than the grace, the push's own new pack).
    assert!(first.packs_condemned >= gold_packs.len(), "{first:?}");
    assert_eq!(r.restarts, 1, "{r:?}");
    // Pass 2 sends again what it had found in gold's pack (3.5 MiB of data).
    assert!(r.chunk_bytes_needed >= 3 << 20, "{r:?}");

    // The deleting run takes gold's pack and manifest; the clone reads back whole.
    past_slack();
    let d = gc(&remote, Duration::ZERO);
    assert!(d.packs_deleted >= gold_packs.len(), "{d:?}");
    assert_eq!(d.manifests_deleted.len(), 1, "{d:?}");
    assert!(objects(&rdir, "packs").is_disjoint(&gold_packs));
    whole_again(&remote, &dir, &rdir, "clone", &t.clone);
}

#[test]
fn a_condemned_snapshot_is_not_named_again_until_a_gc_took_it() {
    let (t, gold_packs) = nameless_gold("rgc-repush");
    let (dir, src, rdir, remote) = (t.dir, t.src, t.rdir, t.remote);
    gc(&remote, Duration::ZERO);
    // Pushing gold again: its pack is condemned, so it goes up again under another name; its
    // manifest is condemned, so the push will not name it.
    let id = src.head("gold").unwrap().unwrap();
    let e = push(
        &src,
        &remote,
        &[("gold".into(), id, true)],
        &PushOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("condemned"), "{e}");
    assert!(objects(&rdir, "refs").is_empty());
    let packs = objects(&rdir, "packs");
    assert!(packs.len() > gold_packs.len(), "{packs:?}");
    past_slack();
    let d = gc(&remote, Duration::ZERO);
    assert_eq!(d.packs_deleted, gold_packs.len(), "{d:?}");
    assert_eq!(d.manifests_deleted.len(), 1, "{d:?}");
    push(
        &src,
        &remote,
        &[("gold".into(), id, true)],
        &PushOptions::default(),
    )
    .unwrap();
    whole_again(&remote, &dir, &rdir, "gold", &t.gold);
}

#[test]
fn a_nameless_snapshot_that_cannot_be_walked_holds_back_pack_deletion_until_it_goes() {
    let (Source { rdir, remote, .. }, gold_packs) = both_pushed("rgc-broken");
    remove_refs(&remote, &["clone".into()]).unwrap();
    // The clone's pack is lost (its index object stays): its manifest cannot be walked.
    for p in objects(&rdir, "packs").difference(&gold_packs) {
        std::fs::remove_file(rdir.join("packs").join(p)).unwrap();
    }
    past_slack();
    let r1 = gc(&remote, Duration::ZERO);
    assert!(!r1.problems.is_empty(), "{r1:?}");
    assert_eq!(r1.manifests_condemned.len(), 1, "{r1:?}");
    assert_eq!((r1.packs_condemned, r1.packs_deleted), (1, 0), "{r1:?}");
    // A live snapshot is never the problem: gold still verifies.
    past_slack();
    let r2 = gc(&remote, Duration::ZERO);
    assert_eq!(r2.manifests_deleted.len(), 1, "{r2:?}");
    assert!(r2.problems.is_empty(), "{r2:?}");
    assert_eq!(r2.packs_deleted, 1, "{r2:?}");
    assert_eq!(objects(&rdir, "index").len(), gold_packs.len());
    assert!(verify_remote(&remote).unwrap().is_clean());
}

#[test]
fn a_gc_stopped_at_any_change_leaves_the_remote_whole_and_the_next_run_finishes() {
    use crate::fault::plan;
    for stop_at in 1.. {
        let (t, gold_packs) = both_pushed(&format!("rgc-stop-{stop_at}"));
        remove_refs(&t.remote, &["clone".into()]).unwrap();
        past_slack();
        let first = gc(&t.remote, Duration::ZERO);
        assert_eq!(first.packs_condemned, 1, "{first:?}");
        past_slack();
        // The deleting run stops at its `stop_at`-th change.
        plan::arm(Some(stop_at));
        let stopped = gc_remote(
            &t.remote,
            RemoteGcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            },
        );
        let ops = plan::disarm().ops;
        if stopped.is_ok() {
            assert!(stop_at > ops && ops >= 4, "{ops} changes");
            break;
        }
        // What is left verifies, gold reads back, and the next run does the rest.
        whole_again(&t.remote, &t.dir, &t.rdir, "gold", &t.gold);
        let next = gc(&t.remote, Duration::ZERO);
        assert!(next.problems.is_empty(), "{next:?}");
        assert_eq!(
            objects(&t.rdir, "packs"),
            gold_packs,
            "stopped at {stop_at}"
        );
        assert_eq!(objects(&t.rdir, "index").len(), gold_packs.len());
        assert_eq!(objects(&t.rdir, "snapshots").len(), 1);
        assert!(objects(&t.rdir, "gc").is_empty(), "stopped at {stop_at}");
        assert!(verify_remote(&t.remote).unwrap().is_clean());
    }
}

#[test]
fn an_encrypted_remote_is_collected_without_its_key_and_stays_sealed() {
    use crate::store::tests::{TEST_COSTS, test_key};
    let dir = tmp("rgc-encrypted");
    let src = Store::create_encrypted(
        &dir.join("src"),
        Default::default(),
        &test_key(),
        TEST_COSTS,
        None,
    )
    .unwrap();
    let (gold, clone) = gold_and_clone(&src);
    let rdir = dir.join("remote");
    let remote = remote_at(&src, &rdir);
    push_names(&src, &remote, &["gold", "clone"]);
    let before = objects(&rdir, "packs");

    // A handle with no key, as `vmnest gc --remote` without key options has.
    let keyless = Arc::new(Remote::open(src.root(), "r").unwrap());
    remove_refs(&keyless, &["clone".into()]).unwrap();
    past_slack();
    let first = gc(&keyless, Duration::ZERO);
    assert_eq!(first.manifests_condemned.len(), 1, "{first:?}");
    past_slack();
    let second = gc(&keyless, Duration::ZERO);
    assert!(second.packs_deleted >= 1, "{second:?}");
    let after = objects(&rdir, "packs");
    assert!(after.len() < before.len() && after.is_subset(&before));
    let report = verify_remote(&keyless).unwrap();
    assert!(report.is_clean() && !report.ids_checked, "{report:?}");

    // No plaintext of either image in what is left, and gold pulls back whole with the key.
    for name in &after {
        let bytes = std::fs::read(rdir.join("packs").join(name)).unwrap();
        for probe in [
            &gold[4096..4160],
            &clone[(1 << 20) + 4096..(1 << 20) + 4160],
        ] {
            assert!(
                !bytes.windows(64).any(|w| w == probe),
                "{name} holds plaintext"
            );
        }
    }
    let section = keyless.encryption().unwrap().unwrap();
    let dst = Arc::new(
        Store::create_encrypted(
            &dir.join("dst"),
            Default::default(),
            &test_key(),
            TEST_COSTS,
            Some(&section),
        )
        .unwrap(),
    );
    let remote2 = remote_at(&dst, &rdir);
    remote2.set_keys(Some(dst.keys().unwrap().clone()));
    pull(&dst, &remote2, "gold").unwrap();
    assert_eq!(read_all(&dst, "gold"), gold);
    let _ = std::fs::remove_dir_all(&dir);
}
