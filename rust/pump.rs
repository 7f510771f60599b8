//! The write-behind's step without the GIL, for the stores that write natively
//! (`sqlite::PySqliteWriter::pump`, `pg::PyPgWriter::pump`): read a batch from a
//! durable cursor, decide its snapshots, write it, and while the reads come full
//! and are stored whole, go on for a while.
//!
//! The Python flusher does the same one step per GIL-holding round; a store that
//! writes here takes the GIL twice per step instead of at every statement.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::batch::PyRecordBatch;
use crate::errors::CoreError;
use crate::py::PyEventCursor;
use crate::snapshots::{is_final, Tracker};

/// `PyRecordBatch::chains()`: per execution, `(id, first base version, last version,
/// last status, delta bytes, first delta bytes, versions)`.
pub(crate) type ChainInfo = (String, u64, u64, &'static str, usize, usize, usize);

/// What a store's write of one batch came to, as far as the loop needs to know.
pub(crate) trait Written {
    /// The snapshot sizes per chain when the batch was stored whole (no refusal, no
    /// error); None otherwise, which ends the step.
    fn stored_whole(&self) -> Option<&[usize]>;
}

/// The step's last batch and what became of it, and `earlier` = `(batches,
/// versions, dropped)` of the full batches stored whole and taken off the cursor
/// before it.
pub(crate) struct Step<W> {
    pub batch: PyRecordBatch,
    pub chains: Vec<ChainInfo>,
    pub flags: Vec<bool>,
    /// None: nothing written (an empty batch).
    pub written: Option<W>,
    pub earlier: (usize, usize, usize),
}

/// Where a step reads and what it may do.
pub(crate) struct Source<'a> {
    pub cursor: &'a PyEventCursor,
    pub id: u64,
    pub tracker: &'a Tracker,
    pub max_events: usize,
    /// The first read waits until then.
    pub first_deadline: Instant,
    /// How long after the first read full batches are still taken.
    pub keep_going: Duration,
    pub skip_before: Option<&'a HashMap<String, u64>>,
}

/// One step (see the module docs). Called without the GIL. The cursor is committed
/// for every batch but the last, which the caller commits once it has accounted
/// for it. A cursor closed after some batches were stored ends the step with an
/// empty batch instead of an error.
pub(crate) fn step<W: Written>(
    source: &Source<'_>,
    mut write: impl FnMut(&PyRecordBatch, &[bool]) -> W,
) -> Result<Step<W>, CoreError> {
    let Source {
        cursor,
        id,
        tracker,
        max_events,
        skip_before,
        ..
    } = *source;
    let mut earlier = (0usize, 0usize, 0usize);
    let mut deadline = source.first_deadline;
    let mut until = None;
    let (batch, chains, flags, written) = loop {
        let before = cursor.position_of(id);
        let batch = match cursor.batch_until(id, max_events, Some(deadline), skip_before) {
            Ok(batch) => batch,
            // Closed by `stop()` after whole batches: report those.
            Err(CoreError::Closed(_)) if earlier.0 > 0 => {
                break (
                    PyRecordBatch::new(Vec::new(), 0),
                    Vec::new(),
                    Vec::new(),
                    None,
                );
            }
            Err(error) => return Err(error),
        };
        let until = *until.get_or_insert_with(|| Instant::now() + source.keep_going);
        // Full: the read stopped at `max_events` events (versions of several events,
        // or stored already, count as the events they are).
        let full = match (before, cursor.position_of(id)) {
            (Ok(before), Ok(after)) => after - before >= max_events as u64,
            _ => false,
        };
        let chains = batch.chains();
        let flags: Vec<bool> = chains
            .iter()
            .map(|(id, base, last, status, bytes, first, _)| {
                tracker.decide_chain(
                    id,
                    *base,
                    *last,
                    is_final(status),
                    *bytes as u64,
                    *first as u64,
                )
            })
            .collect();
        if batch.__len__() == 0 && !full {
            break (batch, chains, flags, None);
        }
        let written = (batch.__len__() > 0).then(|| write(&batch, &flags));
        let sizes = match &written {
            None => Some(&[][..]),
            Some(written) => written.stored_whole(),
        };
        let Some(sizes) = sizes.filter(|_| full && Instant::now() < until) else {
            break (batch, chains, flags, written);
        };
        // Stored whole and full: more may be waiting. Account for it as the flusher
        // would, take it off the ring, and go on without waiting.
        for (chain, size) in chains.iter().zip(sizes) {
            if *size > 0 {
                tracker.snapshotted(&chain.0, *size as u64);
            }
        }
        if cursor.commit_read(id).is_err() {
            // Closed meanwhile: this batch is the step's last.
            break (batch, chains, flags, written);
        }
        earlier.0 += usize::from(written.is_some());
        earlier.1 += chains.iter().map(|chain| chain.6).sum::<usize>();
        earlier.2 += batch.dropped_count();
        deadline = Instant::now();
    };
    Ok(Step {
        batch,
        chains,
        flags,
        written,
        earlier,
    })
}
