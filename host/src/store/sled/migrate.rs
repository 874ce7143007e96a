//! Opening a folder of the first layout (`ferry-sled/1`, one tree per kind of record): its
//! records are copied into the one tree of today's layout.

use super::*;

/// The format tag of the first layout, which kept it in a `meta` tree.
pub(super) fn legacy_format(db: &sled::Db) -> Result<Option<Vec<u8>>, StoreError> {
    if !db.tree_names().iter().any(|name| name.as_ref() == b"meta") {
        return Ok(None);
    }
    let meta = db.open_tree("meta").map_err(backend)?;
    Ok(meta.get("format").map_err(backend)?.map(|tag| tag.to_vec()))
}

/// Copies a folder of the first layout into the `ferry` tree, then drops the old trees. The
/// format tag is written last, in the same flush as the final records: a crash before it leaves
/// the old trees whole, and the next open starts the copy again from an emptied tree.
pub(super) fn migrate_v1(db: &sled::Db, tree: &Tree) -> Result<(), StoreError> {
    tracing::info!("copying the store from format ferry-sled/1 to ferry-sled/2");
    tree.clear().map_err(backend)?;
    let old = |name: &str| db.open_tree(name).map_err(backend);
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    let flush_batch = |batch: &mut sled::Batch, pending: &mut usize, force: bool| {
        if force || *pending >= 10_000 {
            *pending = 0;
            tree.apply_batch(std::mem::take(batch)).map_err(backend)
        } else {
            Ok(())
        }
    };
    for entry in old("messages")?.iter() {
        let (global, json) = entry.map_err(backend)?;
        let global = u64_be(&global);
        let message: Message = decode("message", &json)?;
        let at = message_key(message.stream.category_str(), global);
        batch.insert(
            stream_key(message.stream.as_str(), message.position),
            &global.to_be_bytes(),
        );
        batch.insert(id_key(&message.id), at.as_slice());
        batch.insert(at, json);
        pending += 3;
        flush_batch(&mut batch, &mut pending, false)?;
    }
    for (name, tag) in [
        ("consumers", CONSUMER),
        ("views", VIEW),
        ("parked", PARKED),
        ("deferred", DEFERRED),
    ] {
        for entry in old(name)?.iter() {
            let (old_key, value) = entry.map_err(backend)?;
            let mut new_key = vec![tag];
            new_key.extend_from_slice(&old_key);
            batch.insert(new_key, value);
            pending += 1;
            flush_batch(&mut batch, &mut pending, false)?;
        }
    }
    if let Some(head) = old("meta")?.get("head").map_err(backend)? {
        batch.insert(HEAD_KEY, head);
    }
    batch.insert(FORMAT_KEY, FORMAT);
    flush_batch(&mut batch, &mut pending, true)?;
    db.flush().map_err(backend)?;
    for name in [
        "meta",
        "messages",
        "streams",
        "versions",
        "categories",
        "ids",
        "consumers",
        "views",
        "parked",
        "deferred",
    ] {
        db.drop_tree(name).map_err(backend)?;
    }
    db.flush().map_err(backend)?;
    Ok(())
}
