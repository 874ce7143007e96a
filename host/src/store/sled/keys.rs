//! The tree's key layout (see the module's header) and the encodings of its values.

use super::*;

pub(super) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(super) fn u64_be(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(buf)
}

/// `tag`, then the parts separated by `\0`.
pub(super) fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    key.push(tag);
    for (n, part) in parts.iter().enumerate() {
        if n > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

pub(super) fn seal_key_key(message_id: &str) -> Vec<u8> {
    key(SEAL_KEY, &[message_id.as_bytes()])
}

pub(super) fn snapshot_key(stream: &str, component: &str) -> Vec<u8> {
    key(SNAPSHOT, &[stream.as_bytes(), component.as_bytes()])
}

pub(super) fn consumer_key(consumer: &ConsumerId) -> Vec<u8> {
    key(
        CONSUMER,
        &[
            consumer.category.as_str().as_bytes(),
            consumer.name.as_bytes(),
        ],
    )
}

/// A consumer's stored group record; `None` for a position of the layout before groups (8
/// bytes).
pub(super) fn decode_group(bytes: &[u8]) -> Result<Option<Group>, StoreError> {
    let damaged = || StoreError::Backend("a consumer group record is damaged".into());
    if bytes.len() == 8 {
        return Ok(None);
    }
    let (&[b'G', p0, p1, p2, p3, key], rest) =
        bytes.split_first_chunk::<6>().ok_or_else(damaged)?
    else {
        return Err(damaged());
    };
    let partitions = u32::from_be_bytes([p0, p1, p2, p3]);
    let key = match key {
        0 => PartitionKey::Entity,
        1 => PartitionKey::OriginEntity,
        _ => return Err(damaged()),
    };
    if rest.len() != partitions as usize * 16 {
        return Err(damaged());
    }
    let positions = rest
        .chunks_exact(16)
        .map(|pair| PartitionPosition {
            position: u64_be(&pair[..8]),
            epoch: u64_be(&pair[8..]),
        })
        .collect();
    Ok(Some(Group {
        spec: GroupSpec { partitions, key },
        positions,
    }))
}

pub(super) fn encode_group(group: &Group) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(6 + group.positions.len() * 16);
    bytes.push(b'G');
    bytes.extend_from_slice(&group.spec.partitions.to_be_bytes());
    bytes.push(match group.spec.key {
        PartitionKey::Entity => 0,
        PartitionKey::OriginEntity => 1,
    });
    for position in &group.positions {
        bytes.extend_from_slice(&position.position.to_be_bytes());
        bytes.extend_from_slice(&position.epoch.to_be_bytes());
    }
    bytes
}

/// The prefix of a consumer's parked (`PARKED`) or deferred (`DEFERRED`) records.
pub(super) fn set_aside_prefix(tag: u8, consumer: &ConsumerId) -> Vec<u8> {
    key(
        tag,
        &[
            consumer.category.as_str().as_bytes(),
            consumer.name.as_bytes(),
            &[],
        ],
    )
}

pub(super) fn set_aside_key(tag: u8, consumer: &ConsumerId, global: u64) -> Vec<u8> {
    let mut key = set_aside_prefix(tag, consumer);
    key.extend_from_slice(&global.to_be_bytes());
    key
}

pub(super) fn view_key(table: &str, row: &str) -> Vec<u8> {
    key(VIEW, &[table.as_bytes(), row.as_bytes()])
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    what: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| backend(format!("undecodable {what} record: {e}")))
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
