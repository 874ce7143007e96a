//! Row 1's raw limits: sled alone, the disk's durable appends, and the embedded store's two
//! possible commit points side by side.

use std::time::Instant;

/// Row 1: sled on its own, an insert of a message-sized record and a flush per append.
pub(crate) fn raw_sled_appends(appends: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("messages")?;
    let value = vec![b'x'; 400];
    let start = Instant::now();
    for n in 0..appends as u64 {
        tree.insert(n.to_be_bytes(), value.as_slice())?;
        db.flush()?;
    }
    Ok(appends as f64 / start.elapsed().as_secs_f64())
}

/// Row 1: the disk's durable limit, what no store on it can pass: 400-byte records appended to
/// one file, one `fdatasync` per group of `group` (the group commit a store makes of that many
/// concurrent writers).
pub(crate) fn raw_fdatasync_appends(records: usize, group: usize) -> anyhow::Result<f64> {
    raw_group_commits(records, group, CommitPoint::Bare)
}

/// Where a group's changes to sled (the head, positions, view rows: ~200 bytes) become durable.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum CommitPoint {
    /// No sled changes: the disk's limit.
    Bare,
    /// Written in the group's log records, one sync per group: the log as the only commit point.
    InTheLog,
    /// Today's: the log synced, then sled's batch written to its own file and synced.
    LogThenSled,
}

/// Group commits of 400-byte records as [`CommitPoint`] makes them durable: the disk's cost of
/// each commit point, measured side by side.
pub(crate) fn raw_group_commits(
    records: usize,
    group: usize,
    point: CommitPoint,
) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let mut log = std::fs::File::create(dir.path().join("log"))?;
    let mut sled = std::fs::File::create(dir.path().join("db"))?;
    let record = vec![b'x'; 400];
    let changes = vec![b'y'; 200];
    let start = Instant::now();
    let mut written = 0;
    while written < records {
        for _ in 0..group.min(records - written) {
            log.write_all(&record)?;
        }
        if point == CommitPoint::InTheLog {
            log.write_all(&changes)?;
        }
        log.sync_data()?;
        if point == CommitPoint::LogThenSled {
            sled.write_all(&changes)?;
            sled.sync_data()?;
        }
        written += group;
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}
