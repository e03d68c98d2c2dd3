//! Chunk lists stored out of line, in pages.
//!
//! A record whose chunk list is longer than the inline limit carries only
//! the list's length and SHA-256 digest; the ids live here, in pages of
//! [`LIST_PAGE_IDS`] ids (80 KiB), so no redb value and no in-memory copy
//! grows with the object's size. Identical lists (one file stored under two
//! keys) are stored once: `chunk_list_refs` counts the live records that
//! use each list, and a list is removed in the transaction that drops its
//! last user.
//!
//! A list fetched from a peer is staged first (`chunk_list_staging`, page by
//! page as it arrives), hashed as it goes, and only a complete list whose
//! digest matches its record is moved into place, in the same transaction
//! that applies the record. Staging left over by a crash is dropped at open.

use std::sync::{Arc, atomic::Ordering as AtomicOrdering};

use redb::{ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use sha2::{Digest, Sha256};

use super::{Index, IndexError, ListDigest, OBJECTS, decode};
use crate::{
    crypto::{CHUNK_ID_LEN, ChunkId},
    proto::ObjectRecord,
};

/// Ids per stored page and most ids per `GetChunkList` reply: 80 KiB.
pub const LIST_PAGE_IDS: usize = 4096;
const PAGE_LEN: usize = LIST_PAGE_IDS * CHUNK_ID_LEN;

/// (list digest, page number) -> up to [`LIST_PAGE_IDS`] concatenated ids;
/// every page but the last is full.
pub(super) const LISTS: TableDefinition<(&[u8], u32), &[u8]> = TableDefinition::new("chunk_lists");
/// List digest -> number of live records that use the list.
pub(super) const LIST_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("chunk_list_refs");
/// (staging id, page number) -> ids of a list being fetched.
pub(super) const STAGING: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("chunk_list_staging");
/// Set once every record's inline list is within [`super::MAX_INLINE_CHUNK_IDS`].
const META_LISTS_BOUNDED: &str = "inline_lists_bounded";

pub(super) type Lists<'t> = Table<'t, (&'static [u8], u32), &'static [u8]>;

/// Creates the tables (empty staging: nothing is being fetched at open).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), IndexError> {
    txn.delete_table(STAGING)?;
    txn.open_table(STAGING)?;
    txn.open_table(LISTS)?;
    txn.open_table(LIST_REFS)?;
    Ok(())
}

/// Page `n` of list `digest`, if stored.
pub(super) fn page<T>(lists: &T, digest: &ListDigest, n: u32) -> Result<Option<Vec<u8>>, IndexError>
where
    T: ReadableTable<(&'static [u8], u32), &'static [u8]>,
{
    Ok(lists
        .get((digest.as_slice(), n))?
        .map(|v| v.value().to_vec()))
}

/// Stores `ids` as list `digest`, in pages.
pub(super) fn write_list(
    lists: &mut Lists<'_>,
    digest: &ListDigest,
    ids: &[u8],
) -> Result<(), IndexError> {
    for (n, chunk) in ids.chunks(PAGE_LEN).enumerate() {
        lists.insert((digest.as_slice(), n as u32), chunk)?;
    }
    Ok(())
}

/// Calls `f` on every id of stored list `digest`, a page at a time.
pub(super) fn for_each_id<T>(
    lists: &T,
    digest: &ListDigest,
    mut f: impl FnMut(&[u8]) -> Result<(), IndexError>,
) -> Result<(), IndexError>
where
    T: ReadableTable<(&'static [u8], u32), &'static [u8]>,
{
    for n in 0.. {
        let Some(ids) = page(lists, digest, n)? else {
            return Ok(());
        };
        for id in ids.chunks_exact(CHUNK_ID_LEN) {
            f(id)?;
        }
    }
    Ok(())
}

/// Removes every page of list `digest`.
pub(super) fn remove_list(lists: &mut Lists<'_>, digest: &ListDigest) -> Result<(), IndexError> {
    let mut n = 0;
    while lists.remove((digest.as_slice(), n))?.is_some() {
        n += 1;
    }
    Ok(())
}

impl Index {
    /// Whether this index holds chunk list `digest`.
    pub fn has_list(&self, digest: &ListDigest) -> Result<bool, IndexError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(LIST_REFS)?.get(digest.as_slice())?.is_some())
    }

    /// Ids `offset..offset + n` of stored list `digest`, concatenated, with
    /// `n` at most `max` and at most [`LIST_PAGE_IDS`]; empty past the end.
    /// `None` when the list is not stored here.
    pub fn read_list(
        &self,
        digest: &ListDigest,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, IndexError> {
        let txn = self.db.begin_read()?;
        if txn.open_table(LIST_REFS)?.get(digest.as_slice())?.is_none() {
            return Ok(None);
        }
        let lists = txn.open_table(LISTS)?;
        let max = max.min(LIST_PAGE_IDS);
        let mut out = Vec::with_capacity(max * CHUNK_ID_LEN);
        let mut at = offset;
        while out.len() < max * CHUNK_ID_LEN {
            let Ok(n) = u32::try_from(at / LIST_PAGE_IDS as u64) else {
                break;
            };
            let Some(ids) = page(&lists, digest, n)? else {
                break;
            };
            let from = (at % LIST_PAGE_IDS as u64) as usize * CHUNK_ID_LEN;
            if from >= ids.len() {
                break; // past the end of the last page
            }
            let take = (ids.len() - from).min(max * CHUNK_ID_LEN - out.len());
            out.extend_from_slice(&ids[from..from + take]);
            at += (take / CHUNK_ID_LEN) as u64;
        }
        Ok(Some(out))
    }

    /// Ids `first..first + n` of `record`'s chunk list (inline or out of
    /// line), `n` at most `max` and [`LIST_PAGE_IDS`]: how readers walk a
    /// list of any length in bounded memory. Fails with `MissingList` when
    /// the record's list is gone (the object was replaced or deleted).
    pub fn chunk_ids(
        &self,
        record: &ObjectRecord,
        first: u64,
        max: usize,
    ) -> Result<Vec<ChunkId>, IndexError> {
        let raw = match record.list_digest() {
            Some(d) => self
                .read_list(&d, first, max)?
                .ok_or(IndexError::MissingList(d))?,
            None => {
                let from = usize::try_from(first)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(CHUNK_ID_LEN)
                    .min(record.chunk_ids.len());
                let to = from
                    .saturating_add(max.min(LIST_PAGE_IDS) * CHUNK_ID_LEN)
                    .min(record.chunk_ids.len());
                record.chunk_ids[from..to].to_vec()
            }
        };
        Ok(raw
            .chunks_exact(CHUNK_ID_LEN)
            .filter_map(ChunkId::from_slice)
            .collect())
    }

    /// Starts staging list `digest` of `count` ids, fetched from a peer.
    pub fn stage_list(self: &Arc<Self>, digest: ListDigest, count: u64) -> ListStager {
        ListStager {
            index: self.clone(),
            id: self.next_staging.fetch_add(1, AtomicOrdering::Relaxed),
            digest,
            count,
            received: 0,
            hasher: Sha256::new(),
            partial: Vec::new(),
            pages: 0,
            consumed: false,
        }
    }

    /// Drops the staged pages of staging `id`.
    fn discard_staging(&self, id: u64, pages: u32) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut staging = txn.open_table(STAGING)?;
            for n in 0..pages {
                staging.remove((id, n))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Moves every record's inline list that is longer than
    /// [`super::MAX_INLINE_CHUNK_IDS`] out of line (records written before
    /// the limit existed), once: every stored record then fits a message.
    pub(super) fn bound_inline_lists(&self) -> Result<(), IndexError> {
        let mut long = Vec::new();
        {
            let txn = self.db.begin_read()?;
            if txn
                .open_table(super::META)?
                .get(META_LISTS_BOUNDED)?
                .is_some()
            {
                return Ok(());
            }
            for entry in txn.open_table(OBJECTS)?.iter()? {
                let (k, v) = entry?;
                if v.value().len() > super::MAX_RECORD_LEN {
                    long.push(k.value().to_owned());
                }
            }
        }
        let txn = self.db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let mut lists = txn.open_table(LISTS)?;
            let mut list_refs = txn.open_table(LIST_REFS)?;
            for key in long {
                let Some(v) = objects.get(key.as_str())?.map(|v| v.value().to_vec()) else {
                    continue;
                };
                let record = decode(&key, &v)?;
                let stored = record.header_form(super::MAX_INLINE_CHUNK_IDS);
                let Some(digest) = stored.list_digest() else {
                    continue;
                };
                let users = list_refs
                    .get(digest.as_slice())?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if users == 0 {
                    write_list(&mut lists, &digest, &record.chunk_ids)?;
                }
                list_refs.insert(digest.as_slice(), users + 1)?;
                objects.insert(
                    key.as_str(),
                    prost::Message::encode_to_vec(&stored).as_slice(),
                )?;
            }
            txn.open_table(super::META)?.insert(META_LISTS_BOUNDED, 1)?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// A chunk list being received from a peer, in order: pages are written to
/// the staging table as they fill, the digest is computed on the way, so
/// memory stays at about one page whatever the list's length.
pub struct ListStager {
    index: Arc<Index>,
    id: u64,
    digest: ListDigest,
    count: u64,
    received: u64,
    hasher: Sha256,
    /// Ids not yet written: less than one page.
    partial: Vec<u8>,
    /// Pages written to staging.
    pages: u32,
    /// Set once the pages were moved into place (or dropped) by an apply.
    consumed: bool,
}

impl ListStager {
    /// Ids received so far: where the next request starts.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Ids the list holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the next ids of the list (concatenated). Blocking.
    pub fn append(&mut self, ids: &[u8]) -> Result<(), IndexError> {
        let n = (ids.len() / CHUNK_ID_LEN) as u64;
        if !ids.len().is_multiple_of(CHUNK_ID_LEN) || self.received + n > self.count {
            return Err(IndexError::ListMismatch(format!(
                "{} more bytes of ids after {} of {} ids",
                ids.len(),
                self.received,
                self.count
            )));
        }
        self.hasher.update(ids);
        self.received += n;
        self.partial.extend_from_slice(ids);
        if self.partial.len() >= PAGE_LEN {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Writes the full pages held (and the rest too when `all`).
    fn flush(&mut self, all: bool) -> Result<(), IndexError> {
        let txn = self.index.db.begin_write()?;
        let mut written = 0;
        {
            let mut staging = txn.open_table(STAGING)?;
            for chunk in self.partial.chunks(PAGE_LEN) {
                if chunk.len() < PAGE_LEN && !all {
                    break;
                }
                staging.insert((self.id, self.pages), chunk)?;
                self.pages += 1;
                written += chunk.len();
            }
        }
        txn.commit()?;
        self.partial.drain(..written);
        Ok(())
    }

    /// Checks that the whole list arrived and matches its digest. Blocking.
    pub fn finish(mut self) -> Result<StagedList, IndexError> {
        if self.received != self.count {
            return Err(IndexError::ListMismatch(format!(
                "{} of {} ids arrived",
                self.received, self.count
            )));
        }
        let got: ListDigest = std::mem::take(&mut self.hasher).finalize().into();
        if got != self.digest {
            return Err(IndexError::ListMismatch(format!(
                "ids hash to {}, the record says {}",
                hex::encode(got),
                hex::encode(self.digest)
            )));
        }
        if !self.partial.is_empty() {
            self.flush(true)?;
        }
        Ok(StagedList(self))
    }
}

impl Drop for ListStager {
    fn drop(&mut self) {
        if self.consumed || self.pages == 0 {
            return;
        }
        let (index, id, pages) = (self.index.clone(), self.id, self.pages);
        let discard = move || {
            if let Err(e) = index.discard_staging(id, pages) {
                tracing::warn!(error = %e, "cannot drop a staged chunk list; it goes at the next start");
            }
        };
        // A fetch given up in async code must not block its runtime thread.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(discard)),
            Err(_) => discard(),
        }
    }
}

/// A complete, verified list in staging, ready for [`Index::apply_staged`].
pub struct StagedList(ListStager);

impl StagedList {
    pub(super) fn digest(&self) -> &ListDigest {
        &self.0.digest
    }

    pub(super) fn count(&self) -> u64 {
        self.0.count
    }

    /// Moves the staged pages to `lists` as list `digest` (or drops them if
    /// that list is already stored), inside the caller's transaction.
    pub(super) fn move_into(
        &self,
        txn: &WriteTransaction,
        lists: &mut Lists<'_>,
        already_stored: bool,
    ) -> Result<(), IndexError> {
        let mut staging = txn.open_table(STAGING)?;
        for n in 0..self.0.pages {
            let Some(ids) = staging.remove((self.0.id, n))?.map(|v| v.value().to_vec()) else {
                return Err(IndexError::ListMismatch(format!(
                    "staged page {n} is missing"
                )));
            };
            if !already_stored {
                lists.insert((self.0.digest.as_slice(), n), ids.as_slice())?;
            }
        }
        Ok(())
    }

    /// The pages are in place: nothing to clean up.
    pub(super) fn consumed(mut self) {
        self.0.consumed = true;
    }
}
