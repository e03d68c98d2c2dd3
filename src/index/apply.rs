//! Applying a record: last writer wins, with the chunk reference counts, the
//! SHA-1 map and the record's chunk list changed in the same transaction.

use std::cmp::Ordering;

use prost::Message;
use redb::{ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::{
    BY_SHA1, CHUNK_REFS, Index, IndexError, META, META_HLC, META_LIVE, OBJECTS, chunk_lists,
    compare_versions, decode,
};
use crate::{crypto::CHUNK_ID_LEN, proto::ObjectRecord};

type Refs<'t> = Table<'t, &'static [u8], u64>;

impl Index {
    /// Applies a record if it is newer than what the index holds for its key
    /// (last writer wins). Returns whether it was applied. Chunk reference
    /// counts and the SHA-1 map change in the same transaction.
    ///
    /// The record must pass [`ObjectRecord::validate`]. An inline list
    /// longer than the inline limit is stored out of line; a record whose
    /// list is already out of line needs that list stored here (otherwise
    /// `MissingList`: fetch it and use [`Index::apply_staged`]).
    pub fn apply(&self, record: &ObjectRecord) -> Result<bool, IndexError> {
        self.apply_with(record, None)
    }

    /// Applies a record whose out-of-line list was fetched and verified in
    /// `staged`; the list moves into place in the same transaction.
    pub fn apply_staged(
        &self,
        record: &ObjectRecord,
        staged: chunk_lists::StagedList,
    ) -> Result<bool, IndexError> {
        if record.list_digest().as_ref() != Some(staged.digest())
            || record.chunk_count() as u64 != staged.count()
        {
            return Err(IndexError::ListMismatch(
                "the staged list is not this record's".into(),
            ));
        }
        let applied = self.apply_with(record, Some(&staged))?;
        if applied {
            staged.consumed();
        }
        Ok(applied)
    }

    /// Whether the index holds this record's version of its key, or a newer
    /// one: such a record need not be fetched or applied.
    pub fn is_current(&self, record: &ObjectRecord) -> Result<bool, IndexError> {
        let txn = self.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let Some(bytes) = objects.get(record.key.as_str())? else {
            return Ok(false);
        };
        let held = decode(&record.key, bytes.value())?;
        Ok(compare_versions(record.version.as_ref(), held.version.as_ref()) != Ordering::Greater)
    }

    fn apply_with(
        &self,
        record: &ObjectRecord,
        staged: Option<&chunk_lists::StagedList>,
    ) -> Result<bool, IndexError> {
        record.validate().map_err(|source| IndexError::Invalid {
            key: record.key.clone(),
            source,
        })?;
        let stored = record.header_form(self.inline_limit);
        let txn = self.db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let old = match objects.get(record.key.as_str())? {
                Some(bytes) => Some(decode(&record.key, bytes.value())?),
                None => None,
            };
            if let Some(old) = &old
                && compare_versions(record.version.as_ref(), old.version.as_ref())
                    != Ordering::Greater
            {
                return Ok(false);
            }
            let mut refs = txn.open_table(CHUNK_REFS)?;
            let mut lists = txn.open_table(chunk_lists::LISTS)?;
            // The new list is referenced before the old one is released, so
            // a list both use is never removed in between.
            if !stored.deleted {
                place_list(&txn, &mut lists, record, &stored, staged)?;
            }
            let mut by_sha1 = txn.open_multimap_table(BY_SHA1)?;
            let mut meta = txn.open_table(META)?;
            let mut live = meta.get(META_LIVE)?.map(|v| v.value()).unwrap_or(0);
            if let Some(old) = old.as_ref().filter(|o| !o.deleted) {
                by_sha1.remove(old.sha1.as_ref(), old.key.as_str())?;
                count_refs(&mut refs, &lists, old, false)?;
                if let Some(d) = old.list_digest() {
                    release_list(&txn, &mut lists, &d)?;
                }
                live = live.saturating_sub(1);
            }
            if !stored.deleted {
                by_sha1.insert(stored.sha1.as_ref(), stored.key.as_str())?;
                count_refs(&mut refs, &lists, &stored, true)?;
                live += 1;
            }
            objects.insert(stored.key.as_str(), stored.encode_to_vec().as_slice())?;
            meta.insert(META_LIVE, live)?;
            let hlc = record.version.as_ref().map(|v| v.hlc).unwrap_or(0);
            let mut last = self.hlc.lock().unwrap_or_else(|p| p.into_inner());
            *last = (*last).max(hlc);
            meta.insert(META_HLC, *last)?;
        }
        txn.commit()?;
        Ok(true)
    }
}

/// Makes the stored record's out-of-line list present (from the record's
/// own inline ids, from staging, or already there) and counts one more user.
fn place_list(
    txn: &WriteTransaction,
    lists: &mut chunk_lists::Lists<'_>,
    record: &ObjectRecord,
    stored: &ObjectRecord,
    staged: Option<&chunk_lists::StagedList>,
) -> Result<(), IndexError> {
    let Some(digest) = stored.list_digest() else {
        return Ok(());
    };
    let mut list_refs = txn.open_table(chunk_lists::LIST_REFS)?;
    let users = list_refs
        .get(digest.as_slice())?
        .map(|v| v.value())
        .unwrap_or(0);
    match staged {
        Some(staged) => staged.move_into(txn, lists, users > 0)?,
        None if users > 0 => {}
        None if record.list_digest().is_none() => {
            chunk_lists::write_list(lists, &digest, &record.chunk_ids)?
        }
        None => return Err(IndexError::MissingList(digest)),
    }
    list_refs.insert(digest.as_slice(), users + 1)?;
    Ok(())
}

/// Counts one user less of list `digest`, removing it with its last user.
fn release_list(
    txn: &WriteTransaction,
    lists: &mut chunk_lists::Lists<'_>,
    digest: &super::ListDigest,
) -> Result<(), IndexError> {
    let mut list_refs = txn.open_table(chunk_lists::LIST_REFS)?;
    let users = list_refs
        .get(digest.as_slice())?
        .map(|v| v.value())
        .unwrap_or(0);
    if users <= 1 {
        list_refs.remove(digest.as_slice())?;
        chunk_lists::remove_list(lists, digest)?;
    } else {
        list_refs.insert(digest.as_slice(), users - 1)?;
    }
    Ok(())
}

/// Adds (or removes) one reference to every chunk of a live record, walking
/// an out-of-line list page by page.
fn count_refs(
    refs: &mut Refs<'_>,
    lists: &chunk_lists::Lists<'_>,
    record: &ObjectRecord,
    add: bool,
) -> Result<(), IndexError> {
    let mut one = |id: &[u8]| -> Result<(), IndexError> {
        if add {
            // One tree walk for a chunk no other object uses (the usual
            // case), two otherwise.
            let held = refs.insert(id, 1)?.map(|v| v.value());
            if let Some(n) = held {
                refs.insert(id, n + 1)?;
            }
            return Ok(());
        }
        let n = refs.get(id)?.map(|v| v.value()).unwrap_or(0);
        if n <= 1 {
            refs.remove(id)?;
        } else {
            refs.insert(id, n - 1)?;
        }
        Ok(())
    };
    match record.list_digest() {
        Some(d) => chunk_lists::for_each_id(lists, &d, one),
        None => record
            .chunk_ids
            .chunks_exact(CHUNK_ID_LEN)
            .try_for_each(&mut one),
    }
}
