//! `ferry store check` and `ferry store repair` for a stopped embedded store. The check changes
//! nothing: it reads every record of the log and every entry of its index (see `log::check`),
//! then holds sled's records against the log: the head, each consumer's positions, view rows,
//! parked and deferred messages, seal keys and snapshots. The repair rebuilds what can be
//! derived from the log (the index always; sled's head when sled's files were lost), sets aside
//! what lies past the head, and checks again; acknowledged messages the log lost it cannot make
//! up, and says so.

use std::path::Path;

use super::keys::{backend, decode, decode_group, u64_be};
use super::log::{LogCheck, check_log};
use super::{
    CONSUMER, DEFAULT_CACHE_BYTES, DEFERRED, FORMAT, FORMAT_KEY, HEAD_KEY, LOG_DIR, PARKED,
    SEAL_KEY, SECRET_KEY, SNAPSHOT, SledStore, VIEW, ViewRow, log_bytes,
};
use crate::store::StoreError;

/// What `ferry store check` found.
#[derive(Debug)]
pub struct StoreCheck {
    /// The last acknowledged message's global position, as sled holds it.
    pub head: u64,
    pub log: LogCheck,
    /// Records of sled checked: consumer groups, view rows, parked and deferred messages, seal
    /// keys, snapshots.
    pub records: u64,
    /// Every damage found, each saying where and what mends it; empty for a sound store.
    pub problems: Vec<String>,
}

fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    super::open_db(path, DEFAULT_CACHE_BYTES)
}

/// The first part of a `tag part \0 part ...` key.
fn first_part(key: &[u8]) -> &[u8] {
    key.get(1..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .next()
        .unwrap_or_default()
}

impl SledStore {
    /// Checks the stopped store in `path`, changing nothing. A folder a host holds is
    /// [`StoreError::Locked`].
    pub fn check(path: &Path) -> Result<StoreCheck, StoreError> {
        if !path.join("db").exists() && !path.join(LOG_DIR).exists() {
            return Err(StoreError::Unusable {
                path: path.display().to_string(),
                reason: "it holds no store".into(),
            });
        }
        let db = match open_db(path) {
            Ok(db) => db,
            Err(StoreError::Unusable { reason, .. }) => {
                return Ok(StoreCheck {
                    head: 0,
                    log: LogCheck::default(),
                    records: 0,
                    problems: vec![reason],
                });
            }
            Err(e) => return Err(e),
        };
        let tree = db.open_tree("ferry").map_err(backend)?;
        let log_dir = path.join(LOG_DIR);
        let mut problems = Vec::new();
        let format = tree.get(FORMAT_KEY).map_err(backend)?;
        if tree.is_empty() && log_bytes(&log_dir) > 0 {
            problems.push(format!(
                "sled holds nothing beside a message log of {} bytes: sled's files (db, conf, \
                 snap.*) were lost or replaced. Restore them from a backup, or `ferry store \
                 repair` takes the head from the log (consumers then start again from the \
                 first message; what they write again is de-duplicated by its derived id)",
                log_bytes(&log_dir)
            ));
        } else if format.as_deref().is_some_and(|f| f != FORMAT) {
            problems.push(format!(
                "it is of the earlier format {:?}: opening converts it; check it after",
                String::from_utf8_lossy(format.as_deref().unwrap_or_default())
            ));
            let log = LogCheck::default();
            return Ok(StoreCheck {
                head: 0,
                log,
                records: 0,
                problems,
            });
        }
        let head = tree
            .get(HEAD_KEY)
            .map_err(backend)?
            .map_or(0, |v| u64_be(&v));
        let secret_file = path.join("secret").exists();
        if tree.get(SECRET_KEY).map_err(backend)?.is_some() && !secret_file {
            problems.push(
                "the namespace secret (the file `secret`) is lost: restore it from a backup \
                 (a new one would give what is handled again other ids)"
                    .into(),
            );
        }
        let log = check_log(&log_dir, head)?;
        let mut records = 0;
        for item in tree.iter() {
            let (key, value) = item.map_err(backend)?;
            let Some(&tag) = key.first() else { continue };
            let shown = String::from_utf8_lossy(&key[1..]).replace('\0', "/");
            let mut past_head = |what: &str, global: u64| {
                if global > head {
                    problems.push(format!(
                        "{what} {shown} stands at message {global}, past the head {head}"
                    ));
                }
            };
            match tag {
                CONSUMER => match decode_group(&value) {
                    Ok(Some(group)) => {
                        for position in &group.positions {
                            past_head("consumer", position.position);
                        }
                    }
                    Ok(None) => past_head("consumer", u64_be(&value)),
                    Err(e) => problems.push(format!("consumer {shown}: {e}")),
                },
                VIEW => match decode::<ViewRow>("view row", &value) {
                    Ok(row) => past_head("view row", row.last_update_seq),
                    Err(e) => problems.push(format!("view row {shown}: {e}")),
                },
                PARKED | DEFERRED => {
                    let global = key.len().checked_sub(8).map_or(0, |at| u64_be(&key[at..]));
                    past_head("a parked or deferred message of", global);
                }
                SEAL_KEY => {
                    let id = String::from_utf8_lossy(&key[1..]);
                    if !log.holds_id(&id) {
                        problems.push(format!(
                            "a seal key is kept for message {id}, which the log does not hold"
                        ));
                    }
                }
                SNAPSHOT => {
                    let stream = String::from_utf8_lossy(first_part(&key)).into_owned();
                    match decode::<(u64, String)>("snapshot", &value) {
                        Ok((version, _)) => {
                            let stored = log.versions.get(&stream).copied().unwrap_or(0);
                            if version > stored {
                                problems.push(format!(
                                    "the snapshot of {stream} stands at version {version}, the \
                                     log holds {stored} of its messages"
                                ));
                            }
                        }
                        Err(e) => problems.push(format!("snapshot {shown}: {e}")),
                    }
                }
                _ => continue,
            }
            records += 1;
        }
        problems.extend(log.problems.iter().cloned());
        Ok(StoreCheck {
            head,
            log,
            records,
            problems,
        })
    }

    /// Repairs the stopped store in `path` from its log: sled's head taken from the log when
    /// sled's files were lost, the index rebuilt, what lies past the head set aside (as opening
    /// does). Returns what it did; what it cannot derive is an error naming it.
    pub fn repair(path: &Path) -> Result<Vec<String>, StoreError> {
        let mut done = Vec::new();
        let log_dir = path.join(LOG_DIR);
        if let Err(StoreError::Unusable { .. }) = open_db(path).map(drop) {
            done.push(set_sled_aside(path)?);
        }
        {
            let db = open_db(path)?;
            let tree = db.open_tree("ferry").map_err(backend)?;
            if tree.is_empty() && log_bytes(&log_dir) > 0 {
                if !path.join("secret").exists() {
                    return Err(StoreError::Unusable {
                        path: path.display().to_string(),
                        reason: "sled's files and the namespace secret (the file `secret`) are \
                                 both lost: handled again under a new secret, every message \
                                 would write its outputs again under other ids. Restore them \
                                 from a backup"
                            .into(),
                    });
                }
                let log = check_log(&log_dir, u64::MAX)?;
                tree.insert(FORMAT_KEY, FORMAT).map_err(backend)?;
                tree.insert(HEAD_KEY, &log.messages.to_be_bytes())
                    .map_err(backend)?;
                tree.insert(SECRET_KEY, &[1u8]).map_err(backend)?;
                db.flush().map_err(backend)?;
                done.push(format!(
                    "sled's head taken from the log: {} messages. Consumer positions, view \
                     rows, parked and deferred messages, seal keys and snapshots were in the \
                     lost files: consumers start again from the first message (what they write \
                     again is de-duplicated by its derived id), views fill again as they do",
                    log.messages
                ));
            }
        }
        let index = log_dir.join("index");
        if index.exists() {
            std::fs::remove_dir_all(&index).map_err(|e| StoreError::Unusable {
                path: index.display().to_string(),
                reason: format!("removing the index to rebuild it: {e}"),
            })?;
            done.push("the message index rebuilt from the log".into());
        }
        // Opening rebuilds the index and sets aside what lies past the head.
        drop(SledStore::open(path)?);
        Ok(done)
    }
}

/// Moves sled's files (which it cannot read) into `sled-damaged/` beside them, so that the
/// repair can start sled anew from the log; nothing is deleted.
fn set_sled_aside(path: &Path) -> Result<String, StoreError> {
    let aside = path.join("sled-damaged");
    let failed = |e: std::io::Error| StoreError::Unusable {
        path: path.display().to_string(),
        reason: format!("setting sled's damaged files aside: {e}"),
    };
    std::fs::create_dir_all(&aside).map_err(failed)?;
    for entry in std::fs::read_dir(path).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "db" || name == "conf" || name == "blobs" || name.starts_with("snap.") {
            std::fs::rename(entry.path(), aside.join(&name)).map_err(failed)?;
        }
    }
    Ok(format!(
        "sled could not read its files: they are set aside in {}",
        aside.display()
    ))
}
