//! Unit tests of the index.

use std::sync::Arc;

use super::*;
use crate::config::MIN_CHUNK_SIZE;

fn record(key: &str, hlc: u64, node: &str, chunks: &[u8], deleted: bool) -> ObjectRecord {
    ObjectRecord {
        key: key.into(),
        size: chunks.len() as u64 * MIN_CHUNK_SIZE as u64,
        sha1: vec![hlc as u8; 20].into(),
        chunk_size: MIN_CHUNK_SIZE as u32,
        chunk_ids: chunks
            .iter()
            .flat_map(|b| [*b; 20])
            .collect::<Vec<u8>>()
            .into(),
        version: Some(Version {
            hlc,
            node_id: node.into(),
        }),
        deleted,
        ..Default::default()
    }
}

fn open() -> (tempfile::TempDir, Index) {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(&dir.path().join("index.redb")).unwrap();
    (dir, index)
}

#[test]
fn last_writer_wins_by_clock_then_node_id() {
    let (_d, index) = open();
    assert!(index.apply(&record("k", 10, "a", &[1], false)).unwrap());
    assert!(
        !index.apply(&record("k", 9, "z", &[2], false)).unwrap(),
        "older loses"
    );
    assert!(
        !index.apply(&record("k", 10, "a", &[2], false)).unwrap(),
        "equal is a no-op"
    );
    assert!(
        index.apply(&record("k", 10, "b", &[3], false)).unwrap(),
        "tie: larger id wins"
    );
    let got = index.get_live("k").unwrap().unwrap();
    assert_eq!(got.chunk_id_list().next().unwrap().0, [3; 20]);
    assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 0);
    assert_eq!(index.chunk_refs(&ChunkId([3; 20])).unwrap(), 1);
    assert_eq!(index.live_objects().unwrap(), 1);
}

#[test]
fn tombstones_hide_objects_free_refs_and_lose_to_newer_writes() {
    let (_d, index) = open();
    index
        .apply(&record("k", 10, "a", &[1, 1, 2], false))
        .unwrap();
    assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 2);
    assert!(index.get_by_sha1(&[10; 20]).unwrap().is_some());
    assert!(index.apply(&record("k", 11, "a", &[], true)).unwrap());
    assert!(index.get_live("k").unwrap().is_none());
    assert!(
        index.get("k").unwrap().unwrap().deleted,
        "tombstone is kept"
    );
    assert!(index.get_by_sha1(&[10; 20]).unwrap().is_none());
    assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 0);
    assert_eq!(index.live_objects().unwrap(), 0);
    // A write older than the tombstone stays deleted; a newer one revives.
    assert!(!index.apply(&record("k", 5, "a", &[4], false)).unwrap());
    assert!(index.apply(&record("k", 12, "a", &[4], false)).unwrap());
    assert_eq!(index.live_objects().unwrap(), 1);
}

#[test]
fn shared_chunks_are_counted_per_object() {
    let (_d, index) = open();
    index.apply(&record("a", 1, "n", &[7], false)).unwrap();
    index.apply(&record("b", 2, "n", &[7], false)).unwrap();
    assert_eq!(index.chunk_refs(&ChunkId([7; 20])).unwrap(), 2);
    index.apply(&record("a", 3, "n", &[], true)).unwrap();
    assert_eq!(index.chunk_refs(&ChunkId([7; 20])).unwrap(), 1);
}

#[test]
fn list_pages_by_prefix_and_skips_tombstones() {
    let (_d, index) = open();
    for (i, k) in ["a/1", "a/2", "a/3", "b/1", "a/0"].iter().enumerate() {
        index
            .apply(&record(k, i as u64 + 1, "n", &[], false))
            .unwrap();
    }
    index.apply(&record("a/2", 99, "n", &[], true)).unwrap();
    let page = index.list("a/", None, 2).unwrap();
    let keys: Vec<_> = page.records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a/0", "a/1"]);
    assert!(page.more);
    let page = index.list("a/", Some("a/1"), 2).unwrap();
    let keys: Vec<_> = page.records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a/3"]);
    assert!(!page.more);
    assert_eq!(index.list("", None, 10).unwrap().records.len(), 4);
}

#[test]
fn sync_pages_include_tombstones_and_refs_list_live_chunks() {
    let (_d, index) = open();
    index.apply(&record("a", 1, "n", &[1], false)).unwrap();
    index.apply(&record("b", 2, "n", &[2], false)).unwrap();
    index.apply(&record("b", 3, "n", &[], true)).unwrap();
    index.apply(&record("c", 4, "n", &[3], false)).unwrap();
    let (page, more) = index.records_after(None, 2, PAGE_BYTES).unwrap();
    assert_eq!(
        page.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(more && page[1].deleted);
    let (page, more) = index.records_after(Some("b"), 2, PAGE_BYTES).unwrap();
    assert_eq!(page.len(), 1);
    assert!(!more);
    let refs = index.referenced_chunks(None, 10).unwrap();
    assert_eq!(refs, vec![ChunkId([1; 20]), ChunkId([3; 20])]);
    assert_eq!(
        index
            .referenced_chunks(Some(&ChunkId([1; 20])), 10)
            .unwrap(),
        vec![ChunkId([3; 20])]
    );
}

#[test]
fn repair_queue_persists_attempts_and_due_times() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let (id, other) = (ChunkId([9; 20]), ChunkId([8; 20]));
    {
        let index = Index::open(&path).unwrap();
        assert_eq!(index.queue_repair(&id, |_| 100).unwrap(), 1);
        assert_eq!(index.queue_repair(&id, |n| 100 * n as u64).unwrap(), 2);
        assert_eq!(index.queue_repair(&other, |_| 50).unwrap(), 1);
    }
    // Attempts and due times survive a restart.
    let index = Index::open(&path).unwrap();
    assert_eq!(index.repair_queue_len().unwrap(), 2);
    assert_eq!(index.due_repairs(49, 10).unwrap(), vec![]);
    assert_eq!(index.due_repairs(199, 10).unwrap(), vec![other]);
    assert_eq!(index.due_repairs(200, 10).unwrap(), vec![other, id]);
    assert_eq!(index.due_repairs(200, 1).unwrap().len(), 1, "limit");
    assert_eq!(
        index.queue_repair(&id, |n| 1000 * n as u64).unwrap(),
        3,
        "the attempt count continues after the restart"
    );
    assert_eq!(index.due_repairs(2999, 10).unwrap(), vec![other]);
    index.repair_done(&[id]).unwrap();
    drop(index);
    let index = Index::open(&path).unwrap();
    assert_eq!(index.repair_queue_len().unwrap(), 1, "done survives too");
    assert_eq!(index.due_repairs(u64::MAX, 10).unwrap(), vec![other]);
}

#[test]
fn versions_are_monotonic_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let far_future = u64::MAX >> 2;
    {
        let index = Index::open(&path).unwrap();
        let a = index.next_version("n");
        let b = index.next_version("n");
        assert!(b.hlc > a.hlc);
        index
            .apply(&record("k", far_future, "n", &[], false))
            .unwrap();
    }
    let index = Index::open(&path).unwrap();
    assert!(index.next_version("n").hlc > far_future);
}

/// A live record of `n` distinct chunk ids (seeded), inline.
fn long_record(key: &str, hlc: u64, seed: u8, n: usize) -> ObjectRecord {
    let ids: Vec<u8> = (0..n as u32)
        .flat_map(|i| {
            let mut id = [seed; 20];
            id[..4].copy_from_slice(&i.to_be_bytes());
            id
        })
        .collect();
    ObjectRecord {
        size: n as u64 * MIN_CHUNK_SIZE as u64,
        chunk_ids: ids.into(),
        ..record(key, hlc, "n", &[], false)
    }
}

fn id_at(seed: u8, i: u32) -> ChunkId {
    let mut id = [seed; 20];
    id[..4].copy_from_slice(&i.to_be_bytes());
    ChunkId(id)
}

fn staging_pages(index: &Index) -> usize {
    let txn = index.db.begin_read().unwrap();
    txn.open_table(chunk_lists::STAGING)
        .unwrap()
        .iter()
        .unwrap()
        .count()
}

#[test]
fn a_long_list_is_stored_out_of_line_in_pages_and_read_back_in_order() {
    let (_d, index) = open();
    let n = 10_000;
    assert!(index.apply(&long_record("big", 1, 7, n)).unwrap());
    let stored = index.get("big").unwrap().unwrap();
    assert!(stored.chunk_ids.is_empty());
    assert_eq!(stored.chunk_count(), n);
    assert!(stored.encoded_len() < 200, "the record is a header");
    let digest = stored.list_digest().unwrap();
    assert_eq!(digest, list_digest(&long_record("big", 1, 7, n).chunk_ids));
    // Every stored value is at most one page.
    {
        let txn = index.db.begin_read().unwrap();
        let lists = txn.open_table(chunk_lists::LISTS).unwrap();
        let pages: Vec<usize> = lists
            .iter()
            .unwrap()
            .map(|e| e.unwrap().1.value().len())
            .collect();
        assert_eq!(
            pages,
            [
                LIST_PAGE_IDS * 20,
                LIST_PAGE_IDS * 20,
                (n - 2 * LIST_PAGE_IDS) * 20
            ]
        );
    }
    // Reads across a page boundary and at the end.
    let ids = index.chunk_ids(&stored, 4094, 5).unwrap();
    assert_eq!(ids, (4094..4099).map(|i| id_at(7, i)).collect::<Vec<_>>());
    let tail = index.chunk_ids(&stored, n as u64 - 2, 100).unwrap();
    assert_eq!(tail, [id_at(7, n as u32 - 2), id_at(7, n as u32 - 1)]);
    assert!(index.chunk_ids(&stored, n as u64, 10).unwrap().is_empty());
    assert_eq!(
        index.chunk_ids(&stored, 0, 1_000_000).unwrap().len(),
        LIST_PAGE_IDS
    );
    for i in [0, 4095, 4096, n as u32 - 1] {
        assert_eq!(index.chunk_refs(&id_at(7, i)).unwrap(), 1);
    }
    // A list of exactly the inline limit stays inline.
    index
        .apply(&long_record("edge", 2, 8, MAX_INLINE_CHUNK_IDS))
        .unwrap();
    let edge = index.get("edge").unwrap().unwrap();
    assert!(edge.list_digest().is_none());
    assert_eq!(index.chunk_ids(&edge, 4095, 9).unwrap(), [id_at(8, 4095)]);
}

#[test]
fn identical_lists_are_stored_once_and_removed_with_their_last_user() {
    let (_d, index) = open();
    let n = 5000;
    index.apply(&long_record("a", 1, 3, n)).unwrap();
    index.apply(&long_record("b", 2, 3, n)).unwrap();
    let digest = index.get("a").unwrap().unwrap().list_digest().unwrap();
    assert_eq!(index.chunk_refs(&id_at(3, 4999)).unwrap(), 2);
    // Overwriting a key with the same list keeps it.
    index.apply(&long_record("a", 3, 3, n)).unwrap();
    assert_eq!(index.chunk_refs(&id_at(3, 0)).unwrap(), 2);
    index.apply(&record("a", 4, "n", &[], true)).unwrap();
    assert!(index.has_list(&digest).unwrap());
    assert_eq!(index.chunk_refs(&id_at(3, 0)).unwrap(), 1);
    // Replacing the last user with another list removes this one.
    index.apply(&long_record("b", 5, 4, n)).unwrap();
    assert!(!index.has_list(&digest).unwrap());
    assert!(index.read_list(&digest, 0, 10).unwrap().is_none());
    assert_eq!(index.chunk_refs(&id_at(3, 0)).unwrap(), 0);
    assert_eq!(index.chunk_refs(&id_at(4, 0)).unwrap(), 1);
    let txn = index.db.begin_read().unwrap();
    let pages = txn
        .open_table(chunk_lists::LISTS)
        .unwrap()
        .iter()
        .unwrap()
        .count();
    assert_eq!(pages, 2, "only b's list is left");
}

#[test]
fn a_staged_list_is_applied_only_when_whole_and_matching_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
    let n = 9000;
    let full = long_record("k", 1, 5, n);
    let header = full.header_form(MAX_INLINE_CHUNK_IDS);
    let digest = header.list_digest().unwrap();
    match index.apply(&header) {
        Err(IndexError::MissingList(d)) => assert_eq!(d, digest),
        other => panic!("a header without its list applied: {other:?}"),
    }
    // Too few ids, a wrong id, too many ids: all refused.
    let mut short = index.stage_list(digest, n as u64);
    short.append(&full.chunk_ids[..20 * 5000]).unwrap();
    assert!(staging_pages(&index) > 0);
    assert!(short.finish().is_err());
    assert_eq!(staging_pages(&index), 0, "a failed list leaves no pages");
    let mut wrong = full.chunk_ids.to_vec();
    wrong[20 * 8000] ^= 1;
    let mut bad = index.stage_list(digest, n as u64);
    bad.append(&wrong).unwrap();
    assert!(matches!(bad.finish(), Err(IndexError::ListMismatch(_))));
    let mut long = index.stage_list(digest, 10);
    assert!(long.append(&full.chunk_ids[..20 * 11]).is_err());
    drop(long);
    // In pieces that do not fall on page boundaries.
    let mut good = index.stage_list(digest, n as u64);
    for piece in full.chunk_ids.chunks(20 * 3001) {
        good.append(piece).unwrap();
    }
    let staged = good.finish().unwrap();
    assert!(index.apply_staged(&header, staged).unwrap());
    assert_eq!(staging_pages(&index), 0);
    let stored = index.get("k").unwrap().unwrap();
    assert_eq!(index.chunk_ids(&stored, 8999, 1).unwrap(), [id_at(5, 8999)]);
    assert_eq!(index.chunk_refs(&id_at(5, 4321)).unwrap(), 1);
    // The same header again is current, and needs no list.
    assert!(index.is_current(&header).unwrap());
    assert!(!index.apply(&header).unwrap());
}

#[test]
fn invalid_records_are_refused_and_change_nothing() {
    let (_d, index) = open();
    let mut bad = record("k", 1, "n", &[1], false);
    bad.chunk_size = u32::MAX;
    assert!(matches!(index.apply(&bad), Err(IndexError::Invalid { .. })));
    bad = record("k", 1, "n", &[1], false);
    bad.content_type = "x".repeat(100_000);
    assert!(matches!(index.apply(&bad), Err(IndexError::Invalid { .. })));
    assert!(index.get("k").unwrap().is_none());
    assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 0);
}

#[test]
fn list_and_sync_pages_are_bounded_in_bytes() {
    let (_d, index) = open();
    let md: std::collections::HashMap<String, String> = (0..8)
        .map(|i| (format!("m{i}"), "v".repeat(1000)))
        .collect();
    for i in 0..300u64 {
        let mut r = record(&format!("{i:04}"), i + 1, "n", &[i as u8], false);
        r.metadata = md.clone();
        r.content_type = "t".repeat(MAX_CONTENT_TYPE_LEN);
        index.apply(&r).unwrap();
    }
    let (mut after, mut seen, mut pages) = (None::<String>, 0, 0);
    loop {
        let (page, more) = index
            .records_after(after.as_deref(), 500, PAGE_BYTES)
            .unwrap();
        let bytes: usize = page.iter().map(|r| r.encoded_len()).sum();
        assert!(bytes <= PAGE_BYTES, "{bytes}");
        seen += page.len();
        pages += 1;
        after = page.last().map(|r| r.key.clone());
        if !more {
            break;
        }
    }
    assert_eq!((seen, pages), (300, 3));
    // One record over the budget still makes progress.
    assert_eq!(index.records_after(None, 500, 1).unwrap().0.len(), 1);
    let (mut after, mut seen) = (None::<String>, 0);
    loop {
        let page = index.list("", after.as_deref(), 1000).unwrap();
        let bytes: usize = page.records.iter().map(|r| r.encoded_len()).sum();
        assert!(bytes <= PAGE_BYTES && !page.records.is_empty());
        assert!(
            page.records
                .iter()
                .all(|r| r.chunk_ids.is_empty() && r.chunk_count() == 1)
        );
        seen += page.records.len();
        after = page.records.last().map(|r| r.key.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, 300);
}

#[test]
fn records_written_with_long_inline_lists_move_out_of_line_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let legacy = long_record("old", 1, 9, 6000);
    {
        // An index as an older version wrote it: the whole list inline.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut objects = txn.open_table(OBJECTS).unwrap();
            objects
                .insert("old", legacy.encode_to_vec().as_slice())
                .unwrap();
            let mut refs = txn.open_table(CHUNK_REFS).unwrap();
            for id in legacy.chunk_id_list() {
                refs.insert(id.0.as_slice(), 1).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let index = Index::open(&path).unwrap();
    let stored = index.get("old").unwrap().unwrap();
    assert!(stored.chunk_ids.is_empty() && stored.chunk_count() == 6000);
    assert_eq!(index.chunk_ids(&stored, 5999, 1).unwrap(), [id_at(9, 5999)]);
    // Replacing it releases its list and its chunks.
    index.apply(&record("old", 2, "n", &[], true)).unwrap();
    assert_eq!(index.chunk_refs(&id_at(9, 0)).unwrap(), 0);
    assert!(!index.has_list(&stored.list_digest().unwrap()).unwrap());
}

#[test]
fn a_lower_inline_limit_moves_short_lists_out_of_line() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open_with(&dir.path().join("i.redb"), INDEX_CACHE_BYTES, 4).unwrap();
    index
        .apply(&record("four", 1, "n", &[1, 2, 3, 4], false))
        .unwrap();
    index
        .apply(&record("five", 2, "n", &[1, 2, 3, 4, 5], false))
        .unwrap();
    assert!(index.get("four").unwrap().unwrap().list_digest().is_none());
    let five = index.get("five").unwrap().unwrap();
    assert!(five.list_digest().is_some());
    assert_eq!(index.chunk_ids(&five, 4, 1).unwrap(), [ChunkId([5; 20])]);
}

#[test]
fn the_index_cache_is_bounded_whatever_the_index_size() {
    // redb's own default cache is 1 GiB: a node that walked a large index
    // (a listing, a sync, a repair pass) kept every page it read resident.
    let (_d, index) = open();
    let value = vec![0x5au8; 400];
    let keys = (INDEX_CACHE_BYTES * 3) / value.len();
    let txn = index.db.begin_write().unwrap();
    {
        let mut objects = txn.open_table(OBJECTS).unwrap();
        for i in 0..keys {
            objects
                .insert(format!("cache-test/{i:09}").as_str(), value.as_slice())
                .unwrap();
        }
    }
    txn.commit().unwrap();
    let txn = index.db.begin_read().unwrap();
    let objects = txn.open_table(OBJECTS).unwrap();
    let mut read = 0usize;
    for entry in objects.iter().unwrap() {
        read += entry.unwrap().1.value().len();
    }
    assert_eq!(read, keys * value.len());
    let stats = index.db.cache_stats();
    assert!(
        stats.used_bytes() <= INDEX_CACHE_BYTES && stats.evictions() > 0,
        "after reading {read} bytes of records the cache holds {} bytes (bound {INDEX_CACHE_BYTES}), \
         {} evictions",
        stats.used_bytes(),
        stats.evictions()
    );
}
