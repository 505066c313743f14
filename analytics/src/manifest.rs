//! Commit manifests: the record of one flush, written atomically to `_manifests/<seq:020>.json`.
//! A flush is committed exactly when its manifest exists; see [`crate::sink`] for the protocol.

use crate::error::AnalyticsError;
use crate::warehouse::{MANIFESTS, STAGING, Warehouse};
use chrono::{DateTime, Utc};
use herald_core::DeliveryEvent;
use herald_core::bus::Position;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Format version of the manifest JSON.
const VERSION: u32 = 1;

/// One committed flush.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) version: u32,
    pub(crate) seq: u64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) files: Vec<FileEntry>,
    /// Per bus partition, the next offset after everything this flush (and all before it) covers.
    pub(crate) positions: BTreeMap<u32, u64>,
    /// The newest event time in this flush and all before it: what the stats watermark is
    /// derived from (see [`crate::stats`]). Absent in manifests of versions without stats.
    #[serde(default)]
    pub(crate) max_event_ts: Option<DateTime<Utc>>,
}

/// A Parquet file of a flush: where it was staged, where it belongs, how many rows it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    pub(crate) staged: String,
    pub(crate) path: String,
    pub(crate) rows: u64,
}

impl Manifest {
    /// A manifest for flush `seq`.
    pub(crate) fn new(
        seq: u64,
        files: Vec<FileEntry>,
        positions: BTreeMap<u32, u64>,
        max_event_ts: Option<DateTime<Utc>>,
    ) -> Self {
        Manifest {
            version: VERSION,
            seq,
            created_at: Utc::now(),
            files,
            positions,
            max_event_ts,
        }
    }

    fn key(seq: u64) -> String {
        format!("{MANIFESTS}/{seq:020}.json")
    }

    /// Writes the manifest atomically and durably: the commit point of a flush. On an object
    /// store, fails if a manifest with this sequence number exists (see [`Warehouse::put_new`]).
    pub(crate) fn write(&self, wh: &Warehouse) -> Result<(), AnalyticsError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| self.error(wh, e))?;
        wh.put_new(&Self::key(self.seq), &json)
            .map_err(|e| match e {
                AnalyticsError::ObjectStore {
                    source: object_store::Error::AlreadyExists { .. },
                    ..
                } => self.error(
                    wh,
                    "already exists: another sink is writing this warehouse, or an earlier \
                     attempt of this commit succeeded unacknowledged; recover a new sink",
                ),
                e => e,
            })
    }

    /// The manifest with the highest sequence number, if any.
    pub(crate) fn newest(wh: &Warehouse) -> Result<Option<Manifest>, AnalyticsError> {
        let Some(&seq) = seqs(wh)?.last() else {
            return Ok(None);
        };
        let key = Self::key(seq);
        let manifest: Manifest =
            serde_json::from_slice(&wh.get(&key)?).map_err(|e| AnalyticsError::Manifest {
                location: wh.locate(&key),
                reason: e.to_string(),
            })?;
        if manifest.version != VERSION || manifest.seq != seq {
            return Err(AnalyticsError::Manifest {
                location: wh.locate(&key),
                reason: format!(
                    "unexpected version {} or seq {}",
                    manifest.version, manifest.seq
                ),
            });
        }
        Ok(Some(manifest))
    }

    /// Moves every staged file into place (idempotent: a file already moved is skipped) and
    /// makes the moves durable.
    pub(crate) fn complete_renames(&self, wh: &Warehouse) -> Result<(), AnalyticsError> {
        let mut dirs = BTreeSet::new();
        for f in &self.files {
            if !wh.rename(&f.staged, &f.path)? && !wh.exists(&f.path)? {
                // Only possible if someone removed the file after it was committed.
                tracing::warn!(seq = self.seq, path = %f.path, "committed warehouse file is missing");
                continue;
            }
            if let Some((dir, _)) = f.path.rsplit_once('/') {
                dirs.insert(dir);
            }
        }
        dirs.into_iter().try_for_each(|d| wh.sync_dir(d))
    }

    /// The events in this flush's files (after [`Self::complete_renames`]).
    pub(crate) fn read_events(&self, wh: &Warehouse) -> Result<Vec<DeliveryEvent>, AnalyticsError> {
        let mut out = Vec::new();
        for f in &self.files {
            if wh.exists(&f.path)? {
                out.extend(wh.read_events(&f.path)?);
            }
        }
        Ok(out)
    }

    /// The bus positions this manifest covers.
    pub(crate) fn bus_positions(&self) -> Vec<Position> {
        self.positions
            .iter()
            .map(|(&partition, &next_offset)| Position {
                partition,
                next_offset,
            })
            .collect()
    }

    /// Deletes staging files that this (the newest) manifest does not list: leftovers of a
    /// flush that crashed before its commit point.
    pub(crate) fn delete_unlisted_staging(
        newest: Option<&Manifest>,
        wh: &Warehouse,
    ) -> Result<(), AnalyticsError> {
        let listed: BTreeSet<&str> = newest
            .iter()
            .flat_map(|m| &m.files)
            .map(|f| f.staged.as_str())
            .collect();
        for name in wh.list(STAGING)? {
            let key = format!("{STAGING}/{name}");
            if !listed.contains(key.as_str()) {
                wh.delete(&key)?;
            }
        }
        Ok(())
    }

    /// Deletes all but the newest `keep` manifests, and temporary files of unfinished writes.
    pub(crate) fn prune(wh: &Warehouse, keep: usize) -> Result<(), AnalyticsError> {
        let seqs = seqs(wh)?;
        for seq in &seqs[..seqs.len().saturating_sub(keep.max(1))] {
            wh.delete(&Self::key(*seq))?;
        }
        for name in wh.list(MANIFESTS)? {
            if name.ends_with(".tmp") {
                wh.delete(&format!("{MANIFESTS}/{name}"))?;
            }
        }
        Ok(())
    }

    fn error(&self, wh: &Warehouse, e: impl ToString) -> AnalyticsError {
        AnalyticsError::Manifest {
            location: wh.locate(&Self::key(self.seq)),
            reason: e.to_string(),
        }
    }
}

/// The sequence numbers of the manifests present, ascending.
fn seqs(wh: &Warehouse) -> Result<Vec<u64>, AnalyticsError> {
    let mut seqs: Vec<u64> = wh
        .list(MANIFESTS)?
        .iter()
        .filter_map(|name| name.strip_suffix(".json")?.parse().ok())
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestWarehouse, blocking};

    fn manifest(seq: u64) -> Manifest {
        let file = FileEntry {
            staged: format!("{STAGING}/s{seq}.parquet"),
            path: format!("t/dt=x/part-{seq}.parquet"),
            rows: 3,
        };
        Manifest::new(
            seq,
            vec![file],
            BTreeMap::from([(0, 10 + seq), (1, 4)]),
            None,
        )
    }

    fn check_newest_and_prune(wh: &Warehouse) {
        assert_eq!(Manifest::newest(wh).unwrap(), None);
        for seq in [1, 2, 10, 11] {
            manifest(seq).write(wh).unwrap();
        }
        wh.put_new(&format!("{MANIFESTS}/00000000000000000012.tmp"), b"{")
            .unwrap();
        let newest = Manifest::newest(wh).unwrap().unwrap();
        assert_eq!((newest.seq, &newest.files), (11, &manifest(11).files));
        assert_eq!(newest.positions, manifest(11).positions);
        Manifest::prune(wh, 2).unwrap();
        let mut left = wh.list(MANIFESTS).unwrap();
        left.sort();
        assert_eq!(
            left,
            ["00000000000000000010.json", "00000000000000000011.json"]
        );
    }

    fn check_renames_and_staging(wh: &Warehouse) {
        let m = manifest(1);
        wh.put_new(&m.files[0].staged, b"data").unwrap();
        wh.put_new(&format!("{STAGING}/orphan.parquet"), b"x")
            .unwrap();
        Manifest::delete_unlisted_staging(Some(&m), wh).unwrap();
        assert_eq!(wh.list(STAGING).unwrap(), ["s1.parquet"]);
        m.complete_renames(wh).unwrap();
        m.complete_renames(wh).unwrap();
        assert_eq!(wh.get(&m.files[0].path).unwrap(), b"data");
        assert!(wh.list(STAGING).unwrap().is_empty());
    }

    #[test]
    fn the_newest_manifest_wins_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        check_newest_and_prune(&Warehouse::local(dir.path()));
    }

    #[test]
    fn manifests_written_before_the_stats_read_without_an_event_time() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::local(dir.path());
        let old = r#"{"version": 1, "seq": 4, "created_at": "2026-11-26T07:00:00Z",
            "files": [], "positions": {"0": 12}}"#;
        wh.put_new(&Manifest::key(4), old.as_bytes()).unwrap();
        let read = Manifest::newest(&wh).unwrap().unwrap();
        assert_eq!((read.seq, read.max_event_ts), (4, None));

        let mut m = manifest(5);
        m.max_event_ts = Some(crate::testing::t0());
        m.write(&wh).unwrap();
        assert_eq!(Manifest::newest(&wh).unwrap().unwrap(), m);
    }

    #[test]
    fn renames_are_idempotent_and_unlisted_staging_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        check_renames_and_staging(&Warehouse::local(dir.path()));
    }

    #[tokio::test]
    async fn s3_the_newest_manifest_wins_and_old_ones_are_pruned() {
        let wh = TestWarehouse::s3().await;
        blocking(&wh.wh, check_newest_and_prune).await;
    }

    #[tokio::test]
    async fn s3_renames_are_idempotent_and_unlisted_staging_is_deleted() {
        let wh = TestWarehouse::s3().await;
        blocking(&wh.wh, check_renames_and_staging).await;
    }

    #[tokio::test]
    async fn s3_a_manifest_is_never_overwritten() {
        let wh = TestWarehouse::s3().await;
        blocking(&wh.wh, |wh| {
            manifest(1).write(wh).unwrap();
            let mut other = manifest(1);
            other.positions.insert(0, 99);
            let err = other.write(wh).unwrap_err();
            assert!(matches!(err, AnalyticsError::Manifest { .. }), "{err}");
            assert!(err.to_string().contains("another sink"), "{err}");
            assert!(!err.is_retryable());
            let newest = Manifest::newest(wh).unwrap().unwrap();
            assert_eq!(newest.positions, manifest(1).positions);
        })
        .await;
    }
}
