//! The snapshot policy's bookkeeping: per execution, the last snapshot's version and
//! size and the delta bytes stored since, and the decision whether a version (sync
//! writes) or a write-behind chain (one execution's versions in one batch) carries
//! a whole-state snapshot.
//!
//! It lives in Rust because the sync write path asks it once per update: in Python
//! the lookup, the arithmetic and the item it built cost about 10 µs per update
//! right after a commit's fsync (cold caches), as much as the rest of the manager.

use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::codec;
use crate::model::ExecStatus;
use crate::py::PyVersionRecord;

/// Per execution: the last snapshot's version, the delta bytes since, and the size
/// the next snapshot is weighed against (the last snapshot's, or the creation's
/// delta before the first one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tracked {
    snapshot_version: u64,
    delta_bytes: u64,
    size: u64,
}

/// The rules of `wfstate.SnapshotPolicy`.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub every_versions: Option<u64>,
    pub when_deltas_outweigh: bool,
    pub at_final_status: bool,
}

impl Policy {
    fn wanted(&self, tracked: &Tracked, version: u64, final_status: bool) -> bool {
        (self.at_final_status && final_status)
            || self
                .every_versions
                .is_some_and(|every| version.saturating_sub(tracked.snapshot_version) >= every)
            || (self.when_deltas_outweigh && tracked.delta_bytes >= tracked.size)
    }
}

/// The bookkeeping without Python, for the unit tests and the class below.
#[derive(Debug, Default)]
struct Books {
    tracked: HashMap<String, Tracked>,
    /// Per execution, the last sync decision's version and what was tracked before
    /// it, for `undo` when that version's write fails.
    before: HashMap<String, (u64, Option<Tracked>)>,
}

#[derive(Debug)]
pub struct Tracker {
    policy: Policy,
    books: Mutex<Books>,
}

impl Tracker {
    pub fn new(policy: Policy) -> Self {
        Tracker {
            policy,
            books: Mutex::new(Books::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Books> {
        // The books are consistent after every statement: a panic elsewhere poisons
        // nothing that matters.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn seed(&self, execution_id: &str, snapshot_version: u64, delta_bytes: u64, size: u64) {
        self.lock().tracked.insert(
            execution_id.to_owned(),
            Tracked {
                snapshot_version,
                delta_bytes,
                size,
            },
        );
    }

    /// Versions another writer stored: (version, delta size) in version order.
    pub fn caught_up(&self, execution_id: &str, snapshot_version: u64, newer: &[(u64, u64)]) {
        let mut books = self.lock();
        let Some(entry) = books.tracked.get_mut(execution_id) else {
            return;
        };
        if snapshot_version > entry.snapshot_version {
            entry.snapshot_version = snapshot_version;
            entry.delta_bytes = newer
                .iter()
                .filter(|(version, _)| *version > snapshot_version)
                .map(|(_, size)| size)
                .sum();
        } else {
            entry.delta_bytes += newer.iter().map(|(_, size)| size).sum::<u64>();
        }
    }

    /// Whether one sync version carries a snapshot. A creation (base 0), or an
    /// execution not tracked yet, becomes the baseline and carries none. The
    /// decision counts the version as stored; `undo` takes it back if it is not.
    pub fn decide(
        &self,
        execution_id: &str,
        base_version: u64,
        version: u64,
        final_status: bool,
        delta_size: u64,
    ) -> bool {
        let mut books = self.lock();
        let before = books.tracked.get(execution_id).copied();
        match books.before.get_mut(execution_id) {
            Some(slot) => *slot = (version, before),
            None => {
                books
                    .before
                    .insert(execution_id.to_owned(), (version, before));
            }
        }
        let tracked = &mut books.tracked;
        let entry = match tracked.get_mut(execution_id) {
            Some(entry) if base_version != 0 => entry,
            _ => {
                tracked.insert(
                    execution_id.to_owned(),
                    Tracked {
                        snapshot_version: version,
                        delta_bytes: 0,
                        size: delta_size,
                    },
                );
                return false;
            }
        };
        entry.delta_bytes += delta_size;
        let wanted = self.policy.wanted(entry, version, final_status);
        if wanted {
            entry.snapshot_version = version;
            entry.delta_bytes = 0;
        }
        wanted
    }

    /// Whether a write-behind chain ends with a snapshot: the rules applied once,
    /// at the chain's last version.
    pub fn decide_chain(
        &self,
        execution_id: &str,
        base_version: u64,
        last_version: u64,
        final_status: bool,
        delta_bytes: u64,
        first_delta_bytes: u64,
    ) -> bool {
        let mut books = self.lock();
        let tracked = &mut books.tracked;
        let entry = if base_version == 0 {
            // The creation's delta is the baseline (see `decide`).
            let entry = Tracked {
                snapshot_version: 1,
                delta_bytes: delta_bytes.saturating_sub(first_delta_bytes),
                size: first_delta_bytes,
            };
            tracked.insert(execution_id.to_owned(), entry);
            tracked.get_mut(execution_id).expect("just inserted")
        } else {
            tracked
                .entry(execution_id.to_owned())
                .and_modify(|entry| entry.delta_bytes += delta_bytes)
                .or_insert(Tracked {
                    snapshot_version: base_version,
                    delta_bytes,
                    size: delta_bytes.max(1),
                })
        };
        let wanted = self.policy.wanted(entry, last_version, final_status);
        if wanted {
            entry.snapshot_version = last_version;
            entry.delta_bytes = 0;
        }
        wanted
    }

    /// The size of a snapshot just decided on: the weight of the next one.
    pub fn snapshotted(&self, execution_id: &str, size: u64) {
        if let Some(entry) = self.lock().tracked.get_mut(execution_id) {
            entry.size = size;
        }
    }

    /// Take back the last `decide` for `execution_id`, if it was for `version`: that
    /// version's write failed or was refused, so neither its delta nor its snapshot
    /// is stored, and the next version must be decided as this one was.
    pub fn undo(&self, execution_id: &str, version: u64) {
        let mut books = self.lock();
        if !matches!(books.before.get(execution_id), Some((decided, _)) if *decided == version) {
            return;
        }
        let Some((_, before)) = books.before.remove(execution_id) else {
            return;
        };
        match before {
            Some(entry) => books.tracked.insert(execution_id.to_owned(), entry),
            None => books.tracked.remove(execution_id),
        };
    }

    #[cfg(test)]
    fn get(&self, execution_id: &str) -> Option<Tracked> {
        self.lock().tracked.get(execution_id).copied()
    }
}

pub(crate) fn is_final(status: &str) -> bool {
    ExecStatus::parse(status).is_some_and(ExecStatus::is_final)
}

/// Which versions are stored with a whole-state snapshot, per `SnapshotPolicy`.
///
/// A snapshot is due when any rule fires: `every_versions` versions since the last
/// one; the deltas since the last one outweigh one snapshot
/// (`when_deltas_outweigh`; before the first snapshot the creation's delta stands
/// for its size); a final status (`at_final_status`). Thread-safe.
#[pyclass(frozen, module = "wfstate._core", name = "SnapshotTracker")]
pub struct PySnapshotTracker {
    tracker: Tracker,
}

impl PySnapshotTracker {
    /// The bookkeeping, for a caller without the GIL.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Whether `record` (a sync write's version) is stored with a snapshot.
    fn wants_snapshot(&self, record: &PyVersionRecord) -> bool {
        let state = &record.state;
        self.tracker.decide(
            &state.execution_id,
            record.base_version,
            state.version,
            state.status.is_final(),
            record.delta.len() as u64,
        )
    }

    /// Encode `record`'s snapshot and count it as the execution's newest.
    fn encode_snapshot(&self, record: &PyVersionRecord) -> Vec<u8> {
        let bytes = codec::encode_snapshot(&record.state);
        self.tracker
            .snapshotted(&record.state.execution_id, bytes.len() as u64);
        bytes
    }

    /// `snapshot_for` without the GIL: the snapshot's bytes, or None.
    pub(crate) fn snapshot_of(&self, record: &PyVersionRecord) -> Option<Vec<u8>> {
        self.wants_snapshot(record)
            .then(|| self.encode_snapshot(record))
    }
}

#[pymethods]
impl PySnapshotTracker {
    #[new]
    #[pyo3(signature = (*, every_versions, when_deltas_outweigh, at_final_status))]
    fn new(every_versions: Option<u64>, when_deltas_outweigh: bool, at_final_status: bool) -> Self {
        PySnapshotTracker {
            tracker: Tracker::new(Policy {
                every_versions,
                when_deltas_outweigh,
                at_final_status,
            }),
        }
    }

    /// Start tracking an execution loaded from the store (a `LoadedExecution`).
    fn seed(&self, loaded: &Bound<'_, PyAny>) -> PyResult<()> {
        let execution_id: String = loaded.getattr("execution_id")?.extract()?;
        let snapshot_version: u64 = loaded.getattr("snapshot_version")?.extract()?;
        let delta_bytes: u64 = loaded.getattr("delta_bytes")?.extract()?;
        let snapshot = loaded.getattr("snapshot")?;
        let size = if snapshot.is_none() {
            // No snapshot yet: the creation's delta stands for one.
            let deltas = loaded.getattr("deltas")?;
            if deltas.len()? > 0 {
                deltas.get_item(0)?.get_item(2)?.len()? as u64
            } else {
                0
            }
        } else {
            snapshot.len()? as u64
        };
        self.tracker
            .seed(&execution_id, snapshot_version, delta_bytes, size);
        Ok(())
    }

    /// Take in versions another writer stored, as `read_deltas` gives them
    /// (`(version, recorded_at_us, actor, data)`): their deltas count towards the
    /// next snapshot, from the newest snapshot the store holds (`snapshot_version`),
    /// so that several writers of an execution do not each snapshot it on their own
    /// count.
    fn caught_up(
        &self,
        execution_id: &str,
        snapshot_version: u64,
        newer: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut sizes = Vec::new();
        for row in newer.try_iter()? {
            let row = row?;
            sizes.push((
                row.get_item(0)?.extract::<u64>()?,
                row.get_item(3)?.len()? as u64,
            ));
        }
        self.tracker
            .caught_up(execution_id, snapshot_version, &sizes);
        Ok(())
    }

    /// The snapshot `record` (a sync write's version) is stored with, or None.
    fn snapshot_for<'py>(
        &self,
        py: Python<'py>,
        record: &PyVersionRecord,
    ) -> Option<Bound<'py, PyBytes>> {
        if !self.wants_snapshot(record) {
            return None;
        }
        let bytes = py.detach(|| self.encode_snapshot(record));
        Some(PyBytes::new(py, &bytes))
    }

    /// Whether a write-behind chain (an execution's versions in one batch) ends with
    /// a snapshot: the rules applied once at the chain's last version, so replay
    /// stays bounded by the rule plus one batch.
    fn decide_chain(
        &self,
        execution_id: &str,
        base_version: u64,
        last_version: u64,
        last_status: &str,
        delta_bytes: u64,
        first_delta_bytes: u64,
    ) -> bool {
        self.tracker.decide_chain(
            execution_id,
            base_version,
            last_version,
            is_final(last_status),
            delta_bytes,
            first_delta_bytes,
        )
    }

    /// Record the size of the snapshot `decide_chain` asked for.
    fn snapshotted(&self, execution_id: &str, size: u64) {
        self.tracker.snapshotted(execution_id, size);
    }

    /// Take back `snapshot_for`'s decision for version `version` of `execution_id`,
    /// whose write failed or was refused (nothing of it is stored).
    fn undo(&self, execution_id: &str, version: u64) {
        self.tracker.undo(execution_id, version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(every: Option<u64>) -> Tracker {
        Tracker::new(Policy {
            every_versions: every,
            when_deltas_outweigh: true,
            at_final_status: true,
        })
    }

    #[test]
    fn creation_is_the_baseline_and_deltas_outweigh_it() {
        let t = tracker(None);
        assert!(!t.decide("e", 0, 1, false, 100));
        // 40 + 40 < 100, then 120 >= 100.
        assert!(!t.decide("e", 1, 2, false, 40));
        assert!(!t.decide("e", 2, 3, false, 40));
        assert!(t.decide("e", 3, 4, false, 40));
        assert_eq!(
            t.get("e"),
            Some(Tracked {
                snapshot_version: 4,
                delta_bytes: 0,
                size: 100
            })
        );
        t.snapshotted("e", 1_000);
        assert!(!t.decide("e", 4, 5, false, 999));
        assert!(t.decide("e", 5, 6, false, 1));
    }

    #[test]
    fn every_versions_and_final_status() {
        let t = tracker(Some(3));
        assert!(!t.decide("e", 0, 1, false, 1_000_000));
        assert!(!t.decide("e", 1, 2, false, 1));
        assert!(!t.decide("e", 2, 3, false, 1));
        assert!(t.decide("e", 3, 4, false, 1));
        assert!(t.decide("e", 4, 5, true, 1));
    }

    #[test]
    fn an_undone_decision_is_decided_again() {
        let t = tracker(Some(3));
        assert!(!t.decide("e", 0, 1, false, 1_000_000));
        assert!(!t.decide("e", 1, 2, false, 1));
        assert!(!t.decide("e", 2, 3, false, 1));
        let before = t.get("e");
        assert!(t.decide("e", 3, 4, false, 1));
        t.snapshotted("e", 500);
        // Version 4's write failed: the retry is decided as the first try was.
        t.undo("e", 4);
        assert_eq!(t.get("e"), before);
        assert!(t.decide("e", 3, 4, false, 1));
        // Only the last decision, and only for its own version, is taken back.
        t.undo("e", 3);
        assert_eq!(t.get("e").unwrap().snapshot_version, 4);
        assert!(!t.decide("e", 4, 5, false, 1));
        t.undo("e", 5);
        t.undo("e", 5);
        assert_eq!(t.get("e").unwrap().snapshot_version, 4);
        assert_eq!(t.get("e").unwrap().delta_bytes, 0);
        // An undone creation leaves the execution untracked.
        assert!(!t.decide("f", 0, 1, false, 10));
        t.undo("f", 1);
        assert_eq!(t.get("f"), None);
    }

    #[test]
    fn an_untracked_execution_becomes_the_baseline() {
        let t = tracker(Some(1));
        assert!(!t.decide("e", 7, 8, false, 10));
        assert!(t.decide("e", 8, 9, false, 10));
    }

    #[test]
    fn caught_up_counts_from_the_newest_stored_snapshot() {
        let t = tracker(None);
        t.seed("e", 10, 50, 1_000);
        t.caught_up("e", 10, &[(11, 5), (12, 5)]);
        assert_eq!(t.get("e").map(|e| e.delta_bytes), Some(60));
        t.caught_up("e", 13, &[(13, 5), (14, 7)]);
        assert_eq!(
            t.get("e"),
            Some(Tracked {
                snapshot_version: 13,
                delta_bytes: 7,
                size: 1_000
            })
        );
        // Untracked executions are left alone.
        t.caught_up("other", 3, &[(4, 1)]);
        assert_eq!(t.get("other"), None);
    }

    #[test]
    fn chains() {
        let t = tracker(Some(100));
        // A creation chain: the creation's delta is the baseline.
        assert!(!t.decide_chain("e", 0, 5, false, 140, 100));
        assert_eq!(
            t.get("e"),
            Some(Tracked {
                snapshot_version: 1,
                delta_bytes: 40,
                size: 100
            })
        );
        assert!(t.decide_chain("e", 5, 9, false, 60, 10));
        t.snapshotted("e", 500);
        assert!(!t.decide_chain("e", 9, 20, false, 499, 10));
        assert!(t.decide_chain("e", 20, 21, true, 1, 1));
        // An untracked chain weighs itself.
        assert!(t.decide_chain("f", 3, 4, false, 10, 10));
    }
}
