//! The bounded event ring: every recorded event, in global order, with cursors.
//!
//! Each event carries a global sequence number (from 1) and its execution's version,
//! and each slot keeps the state its version produced, so a recent past version is
//! one lookup away. A per-execution index of sequence numbers means reading one
//! execution's events never scans the ring.
//!
//! The ring must never drop an event a durable reader has not taken: the oldest
//! event is evicted only once every durable cursor has committed past it. When it
//! cannot make room, `append` reports `RingFull` and writes nothing; the caller
//! waits (`wait_for_room`, without holding the GIL) or fails.
//!
//! A write that a store commits between its preparation and its publication
//! reserves its events' room first (`reserve`): once the store holds the version,
//! its append cannot fail for want of room, so a full ring never leaves memory
//! behind the store. While a durable cursor is open, every other append leaves the
//! reserved room free (without one, eviction makes it). The reserved room is bounded
//! only while a durable cursor is open (without one, eviction can always make
//! room); opening the first one makes room for the writes in flight.
//!
//! Lock order: callers may hold an execution's slot lock or a map shard lock when
//! they call into the ring; the ring never calls out while holding its lock.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::errors::CoreError;
use crate::model::{EventKind, State};

/// One recorded event. `data` is the MessagePack encoding of its JSON data.
#[derive(Debug, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub execution_id: Arc<str>,
    pub version: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub timestamp: i64,
    pub kind: EventKind,
    pub node_id: Option<Arc<str>>,
    pub actor: Option<Arc<str>>,
    pub data: Box<[u8]>,
}

/// An event computed by `prepare`, waiting for its sequence number.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingEvent {
    pub kind: EventKind,
    pub node_id: Option<Arc<str>>,
    pub data: Box<[u8]>,
}

struct Slot {
    event: Arc<Event>,
    /// The state right after `event.version` was written.
    state: Arc<State>,
    /// Already committed to the store by the write path (sync writes): the
    /// write-behind flusher passes over it.
    persisted: bool,
}

/// One event as a durable reader sees it: with its version's state and whether the
/// write path has stored it already.
pub struct ReadSlot {
    pub event: Arc<Event>,
    pub state: Arc<State>,
    pub persisted: bool,
}

#[derive(Default)]
struct ExecIndex {
    seqs: VecDeque<u64>,
    /// The highest version of this execution that lost an event to eviction.
    evicted_version: u64,
    /// The timestamp of the newest evicted event of this execution.
    evicted_until: i64,
}

struct CursorPos {
    durable: bool,
    /// The next sequence number `read` returns.
    position: u64,
    /// Every event below this sequence number has been taken (durable cursors).
    committed: u64,
    missed: u64,
}

struct Inner {
    slots: VecDeque<Slot>,
    /// The sequence number of `slots[0]` (or of the next event when empty).
    first_seq: u64,
    index: HashMap<Arc<str>, ExecIndex>,
    cursors: HashMap<u64, CursorPos>,
    next_cursor_id: u64,
    closed: bool,
    /// Room promised to `Reservation`s not yet used or dropped.
    reserved: usize,
}

/// Room for a number of events, kept for one append while a durable cursor is open
/// (see the module docs).
/// Dropping it unused gives the room back.
pub struct Reservation {
    ring: Arc<Ring>,
    count: AtomicUsize,
}

impl Reservation {
    /// Give the room back now (a write that will not be published); idempotent.
    pub fn release(&self) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        // Under the ring's lock, as `append` uses it: the two cannot both count it.
        let mut inner = self.ring.inner.lock();
        let count = self.count.swap(0, Ordering::AcqRel);
        if count > 0 {
            inner.reserved -= count;
            self.ring.room.notify_all();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reservation({})", self.count.load(Ordering::Acquire))
    }
}

/// What the ring knows of one past version of an execution.
pub enum VersionLookup {
    Found(Arc<State>),
    Evicted,
    Unknown,
}

/// Which of an execution's events a history query wants.
#[derive(Clone, Debug, Default)]
pub struct HistoryFilter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub kinds: Option<[bool; EventKind::ALL.len()]>,
    pub node_id: Option<String>,
    pub after_version: Option<u64>,
    pub limit: Option<usize>,
}

impl HistoryFilter {
    pub fn matches(&self, event: &Event) -> bool {
        self.since.is_none_or(|since| event.timestamp >= since)
            && self.until.is_none_or(|until| event.timestamp < until)
            && self.kinds.is_none_or(|kinds| kinds[event.kind.index()])
            && self
                .node_id
                .as_deref()
                .is_none_or(|node| event.node_id.as_deref() == Some(node))
            && self.after_version.is_none_or(|after| event.version > after)
    }
}

pub struct Ring {
    inner: Mutex<Inner>,
    /// Signalled when a durable cursor commits (room may have appeared) or on close.
    room: Condvar,
    /// Signalled when events are appended, for cursors waiting to read.
    arrived: Condvar,
    capacity: usize,
}

pub struct RingStats {
    pub len: usize,
    pub capacity: usize,
    pub first_seq: u64,
    pub next_seq: u64,
    pub cursors: usize,
    pub durable_cursors: usize,
}

impl Ring {
    pub const MIN_CAPACITY: usize = 16;

    pub fn new(capacity: usize) -> Result<Self, CoreError> {
        if capacity < Self::MIN_CAPACITY {
            return Err(CoreError::Validation(format!(
                "ring_capacity must be at least {}, not {capacity}",
                Self::MIN_CAPACITY
            )));
        }
        Ok(Ring {
            inner: Mutex::new(Inner {
                slots: VecDeque::with_capacity(capacity.min(1 << 16)),
                first_seq: 1,
                index: HashMap::new(),
                cursors: HashMap::new(),
                next_cursor_id: 1,
                closed: false,
                reserved: 0,
            }),
            room: Condvar::new(),
            arrived: Condvar::new(),
            capacity,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn check_fits(&self, needed: usize) -> Result<(), CoreError> {
        if needed > self.capacity {
            return Err(CoreError::Validation(format!(
                "the update records {needed} events, more than the ring holds ({})",
                self.capacity
            )));
        }
        Ok(())
    }

    /// Keep room for `needed` events until the returned reservation is used by
    /// `append` or dropped; `RingFull` when the room is not there now.
    ///
    /// Only a durable cursor can hold eviction back. While one is open, the events
    /// and the reserved room never exceed the capacity, so an append into its
    /// reservation always fits. With none open, eviction can always make room: the
    /// reservations are counted but not bounded, and opening the first durable
    /// cursor makes room for them (`open_cursor`).
    pub fn reserve(self: &Arc<Self>, needed: usize) -> Result<Reservation, CoreError> {
        self.check_fits(needed)?;
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(CoreError::Closed("the state manager is closed".into()));
        }
        let wanted = inner.reserved + needed;
        if inner.has_durable_cursor() && !inner.make_room(wanted, self.capacity) {
            return Err(CoreError::RingFull { needed });
        }
        inner.reserved = wanted;
        Ok(Reservation {
            ring: self.clone(),
            count: AtomicUsize::new(needed),
        })
    }

    /// Append one version's events (the version and time are the state's), all or
    /// nothing, into the room `reservation` kept (else into free room, leaving the
    /// reserved room alone). Returns the first sequence number.
    pub fn append(
        &self,
        state: &Arc<State>,
        actor: &Option<Arc<str>>,
        events: &[PendingEvent],
        persisted: bool,
        reservation: Option<&Reservation>,
    ) -> Result<u64, CoreError> {
        let execution_id = &state.execution_id;
        let (version, timestamp) = (state.version, state.updated_at);
        let needed = events.len();
        self.check_fits(needed)?;
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(CoreError::Closed("the state manager is closed".into()));
        }
        // A reservation of this ring is used (its room handed back to the append)
        // under the ring's lock, so no other append can take that room meanwhile.
        let held = reservation
            .filter(|r| std::ptr::eq(Arc::as_ptr(&r.ring), self))
            .map_or(0, |r| r.count.load(Ordering::Acquire));
        if !inner.make_room_beside(needed, held, self.capacity) {
            return Err(CoreError::RingFull { needed });
        }
        if held > 0 {
            if let Some(reservation) = reservation {
                reservation.count.store(0, Ordering::Release);
            }
            // Room changes hands (reserved to used): nobody waiting gains any.
            inner.reserved -= held;
        }
        let first = inner.first_seq + inner.slots.len() as u64;
        let inner = &mut *inner;
        let index = inner.index.entry(execution_id.clone()).or_default();
        for (offset, pending) in events.iter().enumerate() {
            let seq = first + offset as u64;
            index.seqs.push_back(seq);
            inner.slots.push_back(Slot {
                event: Arc::new(Event {
                    seq,
                    execution_id: execution_id.clone(),
                    version,
                    timestamp,
                    kind: pending.kind,
                    node_id: pending.node_id.clone(),
                    actor: actor.clone(),
                    data: pending.data.clone(),
                }),
                state: state.clone(),
                persisted,
            });
        }
        if !inner.cursors.is_empty() {
            self.arrived.notify_all();
        }
        Ok(first)
    }

    /// Block until `needed` events fit, the deadline passes (false) or the ring closes.
    pub fn wait_for_room(&self, needed: usize, deadline: Instant) -> bool {
        let mut inner = self.inner.lock();
        loop {
            if inner.closed {
                return false;
            }
            if inner.make_room_beside(needed, 0, self.capacity) {
                return true;
            }
            if self.room.wait_until(&mut inner, deadline).timed_out() {
                return inner.make_room_beside(needed, 0, self.capacity);
            }
        }
    }

    /// Whether `needed` more events fit, beside the reserved room.
    pub fn has_room(&self, needed: usize) -> bool {
        let mut inner = self.inner.lock();
        inner.make_room_beside(needed, 0, self.capacity)
    }

    /// The state right after `version` of `execution_id`, if the ring still holds it.
    pub fn state_at(&self, execution_id: &str, version: u64) -> VersionLookup {
        let inner = self.inner.lock();
        let Some(index) = inner.index.get(execution_id) else {
            return VersionLookup::Unknown;
        };
        // The per-execution sequence numbers are in version order: binary search.
        let seqs = &index.seqs;
        let position = seqs.partition_point(|seq| inner.slot(*seq).event.version < version);
        match seqs.get(position).map(|seq| inner.slot(*seq)) {
            Some(slot) if slot.event.version == version => VersionLookup::Found(slot.state.clone()),
            _ if version <= index.evicted_version => VersionLookup::Evicted,
            _ => VersionLookup::Unknown,
        }
    }

    /// The events of one execution that match `filter`, oldest first.
    pub fn history(
        &self,
        execution_id: &str,
        filter: &HistoryFilter,
    ) -> Result<Vec<Arc<Event>>, CoreError> {
        let inner = self.inner.lock();
        let Some(index) = inner.index.get(execution_id) else {
            return Ok(Vec::new());
        };
        let lost_matter = index.evicted_version > filter.after_version.unwrap_or(0)
            && filter
                .since
                .is_none_or(|since| since <= index.evicted_until);
        if lost_matter {
            return Err(CoreError::HistoryEvicted(format!(
                "events of execution {execution_id:?} up to version {} are no longer held in memory",
                index.evicted_version
            )));
        }
        let seqs = &index.seqs;
        let start = match filter.after_version {
            Some(after) => seqs.partition_point(|seq| inner.slot(*seq).event.version <= after),
            None => 0,
        };
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut events = Vec::new();
        for seq in seqs.range(start..) {
            if events.len() >= limit {
                break;
            }
            let event = &inner.slot(*seq).event;
            if filter.until.is_some_and(|until| event.timestamp >= until) {
                // Timestamps never go backwards within an execution.
                break;
            }
            if filter.matches(event) {
                events.push(event.clone());
            }
        }
        Ok(events)
    }

    pub fn open_cursor(&self, durable: bool, from_oldest: bool) -> Result<u64, CoreError> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(CoreError::Closed("the state manager is closed".into()));
        }
        if durable && !inner.has_durable_cursor() {
            // From now on eviction can be held back: first make the room the writes
            // in flight have reserved (see `reserve`), while nothing holds it back.
            let reserved = inner.reserved;
            if !inner.make_room(reserved, self.capacity) {
                return Err(CoreError::Backpressure(format!(
                    "cannot open a durable cursor now: the writes in flight need room for \
                     {reserved} events, more than the ring holds ({})",
                    self.capacity
                )));
            }
        }
        let start = if from_oldest {
            inner.first_seq
        } else {
            inner.next_seq()
        };
        let id = inner.next_cursor_id;
        inner.next_cursor_id += 1;
        inner.cursors.insert(
            id,
            CursorPos {
                durable,
                position: start,
                committed: start,
                missed: 0,
            },
        );
        Ok(id)
    }

    /// Up to `max_events` events from the cursor's position, waiting until `deadline`
    /// for the first one when there is none.
    pub fn read(
        &self,
        cursor: u64,
        max_events: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Arc<Event>>, CoreError> {
        self.read_with(cursor, max_events, deadline, false, |slot| {
            slot.event.clone()
        })
    }

    /// Like `read`, for durable readers: whole versions only (the last one is completed
    /// past `max_events` if needed), each event with its state.
    pub fn read_slots(
        &self,
        cursor: u64,
        max_events: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<ReadSlot>, CoreError> {
        self.read_with(cursor, max_events, deadline, true, |slot| ReadSlot {
            event: slot.event.clone(),
            state: slot.state.clone(),
            persisted: slot.persisted,
        })
    }

    fn read_with<T>(
        &self,
        cursor: u64,
        max_events: usize,
        deadline: Option<Instant>,
        whole_versions: bool,
        take: impl Fn(&Slot) -> T,
    ) -> Result<Vec<T>, CoreError> {
        let mut inner = self.inner.lock();
        loop {
            let first_seq = inner.first_seq;
            let next_seq = inner.next_seq();
            let closed = inner.closed;
            let pos = inner.cursor_mut(cursor)?;
            if pos.position < first_seq {
                // Only a live cursor can fall behind: eviction waits for durable ones.
                pos.missed += first_seq - pos.position;
                pos.position = first_seq;
            }
            let start = pos.position;
            if start < next_seq || closed {
                let mut end = next_seq.min(start.saturating_add(max_events.max(1) as u64));
                if whole_versions {
                    while end < next_seq && end > start {
                        let last = &inner.slot(end - 1).event;
                        let next = &inner.slot(end).event;
                        if next.version != last.version || next.execution_id != last.execution_id {
                            break;
                        }
                        end += 1;
                    }
                }
                inner.cursor_mut(cursor)?.position = end;
                return Ok((start..end).map(|seq| take(inner.slot(seq))).collect());
            }
            match deadline {
                Some(deadline) => {
                    if self.arrived.wait_until(&mut inner, deadline).timed_out() {
                        return Ok(Vec::new());
                    }
                }
                None => return Ok(Vec::new()),
            }
        }
    }

    /// Forget the indexed events of `execution_id` (a lineage the store refused) and
    /// answer for versions up to `version` from the store from now on. Returns the next
    /// sequence number: the execution's later events follow the reset.
    pub fn reset_execution(&self, execution_id: &Arc<str>, version: u64, timestamp: i64) -> u64 {
        let mut inner = self.inner.lock();
        let next_seq = inner.next_seq();
        let index = inner.index.entry(execution_id.clone()).or_default();
        index.seqs.clear();
        index.evicted_version = version;
        index.evicted_until = timestamp;
        next_seq
    }

    /// Record that `execution_id` was loaded from a store at `version`: its earlier
    /// events are not in the ring, and queries for them must go to the store.
    pub fn mark_loaded(&self, execution_id: &Arc<str>, version: u64, timestamp: i64) {
        let mut inner = self.inner.lock();
        let index = inner.index.entry(execution_id.clone()).or_default();
        if index.evicted_version < version {
            index.evicted_version = version;
            index.evicted_until = index.evicted_until.max(timestamp);
        }
    }

    /// Mark every event up to and including `seq` (default: all read) as taken.
    pub fn commit(&self, cursor: u64, seq: Option<u64>) -> Result<(), CoreError> {
        let mut inner = self.inner.lock();
        let pos = inner.cursor_mut(cursor)?;
        let upto = seq.map_or(pos.position, |seq| seq.saturating_add(1).min(pos.position));
        if upto > pos.committed {
            pos.committed = upto;
            if pos.durable {
                self.room.notify_all();
            }
        }
        Ok(())
    }

    pub fn cursor_info(&self, cursor: u64) -> Result<(u64, u64, u64), CoreError> {
        let mut inner = self.inner.lock();
        let pos = inner.cursor_mut(cursor)?;
        Ok((pos.position, pos.committed, pos.missed))
    }

    /// Forget a cursor: a durable one stops holding back eviction, and a thread
    /// waiting in its `read` wakes up with `Closed`.
    pub fn close_cursor(&self, cursor: u64) {
        let mut inner = self.inner.lock();
        if let Some(pos) = inner.cursors.remove(&cursor) {
            if pos.durable {
                self.room.notify_all();
            }
            self.arrived.notify_all();
        }
    }

    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        self.room.notify_all();
        self.arrived.notify_all();
    }

    pub fn stats(&self) -> RingStats {
        let inner = self.inner.lock();
        RingStats {
            len: inner.slots.len(),
            capacity: self.capacity,
            first_seq: inner.first_seq,
            next_seq: inner.next_seq(),
            cursors: inner.cursors.len(),
            durable_cursors: inner.cursors.values().filter(|c| c.durable).count(),
        }
    }
}

impl Inner {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.slots.len() as u64
    }

    fn slot(&self, seq: u64) -> &Slot {
        &self.slots[(seq - self.first_seq) as usize]
    }

    fn cursor_mut(&mut self, cursor: u64) -> Result<&mut CursorPos, CoreError> {
        self.cursors
            .get_mut(&cursor)
            .ok_or_else(|| CoreError::Closed("the event cursor is closed".into()))
    }

    fn has_durable_cursor(&self) -> bool {
        self.cursors.values().any(|c| c.durable)
    }

    /// `make_room` for `needed` events beside the room reserved for others (all
    /// but the caller's own `held`). The reserved room is kept free only while a
    /// durable cursor is open: without one, eviction can always make the room a
    /// reservation's append will need. (No reservation out, the usual case: no
    /// look at the cursors.)
    fn make_room_beside(&mut self, needed: usize, held: usize, capacity: usize) -> bool {
        let others = self.reserved - held;
        if others > 0 && self.has_durable_cursor() {
            self.make_room(needed + others, capacity)
        } else {
            self.make_room(needed, capacity)
        }
    }

    /// Evict what may be evicted until `needed` more events fit; false if they can't.
    fn make_room(&mut self, needed: usize, capacity: usize) -> bool {
        if needed > capacity {
            return false;
        }
        let excess = (self.slots.len() + needed).saturating_sub(capacity);
        if excess == 0 {
            return true;
        }
        let taken_below = self
            .cursors
            .values()
            .filter(|c| c.durable)
            .map(|c| c.committed)
            .min()
            .unwrap_or(u64::MAX);
        if self.first_seq + excess as u64 > taken_below {
            return false;
        }
        for _ in 0..excess {
            let slot = self.slots.pop_front().expect("excess <= len");
            self.first_seq += 1;
            let event = &slot.event;
            if let Some(index) = self.index.get_mut(&event.execution_id) {
                // After a reset the execution's index no longer lists its older events.
                if index.seqs.front() == Some(&event.seq) {
                    index.seqs.pop_front();
                    index.evicted_version = event.version;
                    index.evicted_until = event.timestamp;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;

    fn state(id: &str, version: u64) -> Arc<State> {
        let (mut state, _) = model::create(id.into(), "wf".into(), vec![], vec![], 0, 0);
        state.version = version;
        Arc::new(state)
    }

    fn one(kind: EventKind) -> Vec<PendingEvent> {
        vec![PendingEvent {
            kind,
            node_id: None,
            data: Box::new([]),
        }]
    }

    /// One status-change event of `e` at `version`, into `reservation` if given.
    fn append_one(
        ring: &Ring,
        version: u64,
        reservation: Option<&Reservation>,
    ) -> Result<u64, CoreError> {
        ring.append(
            &state("e", version),
            &None,
            &one(EventKind::StatusChange),
            false,
            reservation,
        )
    }

    #[test]
    fn evicts_oldest_without_durable_readers_and_answers_past_versions() {
        let ring = Ring::new(16).unwrap();
        for version in 1..=20 {
            append_one(&ring, version, None).unwrap();
        }
        assert!(matches!(ring.state_at("e", 4), VersionLookup::Evicted));
        match ring.state_at("e", 10) {
            VersionLookup::Found(s) => assert_eq!(s.version, 10),
            _ => panic!("version 10 should be held"),
        }
        assert!(matches!(ring.state_at("e", 21), VersionLookup::Unknown));
        let filter = HistoryFilter {
            after_version: Some(10),
            ..HistoryFilter::default()
        };
        let versions: Vec<u64> = ring
            .history("e", &filter)
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (11..=20).collect::<Vec<_>>());
        assert!(matches!(
            ring.history("e", &HistoryFilter::default()),
            Err(CoreError::HistoryEvicted(_))
        ));
    }

    #[test]
    fn durable_cursor_blocks_eviction_until_commit() {
        let ring = Ring::new(16).unwrap();
        let cursor = ring.open_cursor(true, false).unwrap();
        for version in 1..=16 {
            append_one(&ring, version, None).unwrap();
        }
        let full = append_one(&ring, 17, None);
        assert_eq!(full, Err(CoreError::RingFull { needed: 1 }));
        assert_eq!(ring.stats().len, 16);
        let events = ring.read(cursor, 4, None).unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // Read but not committed: still not evictable.
        assert!(!ring.has_room(1));
        ring.commit(cursor, Some(2)).unwrap();
        assert!(ring.has_room(2));
        assert!(!ring.has_room(3));
        ring.commit(cursor, None).unwrap();
        assert!(ring.has_room(4));
    }

    #[test]
    fn live_cursor_counts_missed_events() {
        let ring = Ring::new(16).unwrap();
        let cursor = ring.open_cursor(false, false).unwrap();
        for version in 1..=40 {
            append_one(&ring, version, None).unwrap();
        }
        let events = ring.read(cursor, 100, None).unwrap();
        assert_eq!(events.len(), 16);
        assert_eq!(events[0].seq, 25);
        assert_eq!(ring.cursor_info(cursor).unwrap().2, 24);
    }

    #[test]
    fn blocked_writer_proceeds_when_the_reader_commits() {
        let ring = Arc::new(Ring::new(16).unwrap());
        let cursor = ring.open_cursor(true, false).unwrap();
        for version in 1..=16 {
            append_one(&ring, version, None).unwrap();
        }
        let reader = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                ring.read(cursor, 16, None).unwrap();
                ring.commit(cursor, None).unwrap();
            })
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        assert!(ring.wait_for_room(1, deadline));
        reader.join().unwrap();
    }

    #[test]
    fn reserved_room_is_kept_for_its_append_and_given_back_when_dropped() {
        let ring = Arc::new(Ring::new(16).unwrap());
        let cursor = ring.open_cursor(true, false).unwrap();
        let append = |version, reservation| append_one(&ring, version, reservation);
        for version in 1..=14 {
            append(version, None).unwrap();
        }
        let first = ring.reserve(1).unwrap();
        let second = ring.reserve(1).unwrap();
        // 14 events and 2 reserved: the ring is full for everyone else.
        assert_eq!(
            ring.reserve(1).unwrap_err(),
            CoreError::RingFull { needed: 1 }
        );
        assert_eq!(append(15, None), Err(CoreError::RingFull { needed: 1 }));
        assert!(!ring.has_room(1));
        // A reservation's own append goes in, and uses it up.
        assert_eq!(append(15, Some(&first)), Ok(15));
        assert_eq!(format!("{first:?}"), "Reservation(0)");
        assert_eq!(append(16, None), Err(CoreError::RingFull { needed: 1 }));
        // Dropped unused: its room is free again.
        drop(second);
        assert_eq!(append(16, None), Ok(16));
        assert_eq!(ring.stats().len, 16);
        // A used reservation gives nothing back twice.
        drop(first);
        assert!(!ring.has_room(1));
        ring.read(cursor, 2, None).unwrap();
        ring.commit(cursor, None).unwrap();
        assert!(ring.has_room(2));
        let third = ring.reserve(2).unwrap();
        assert!(!ring.has_room(1));
        third.release();
        third.release();
        assert!(ring.has_room(2));
    }

    #[test]
    fn reservations_are_bounded_only_while_a_durable_cursor_holds_eviction_back() {
        let ring = Arc::new(Ring::new(16).unwrap());
        let append = |version, reservation| append_one(&ring, version, reservation);
        // No durable cursor: eviction makes any room, so reservations are not
        // bounded, however many writes are in flight.
        let free: Vec<Reservation> = (0..40).map(|_| ring.reserve(1).unwrap()).collect();
        for (index, reservation) in free.iter().enumerate() {
            append(index as u64 + 1, Some(reservation)).unwrap();
        }
        assert!(ring.has_room(16));
        // With one: reservations add up to the capacity at most, and never panic.
        let cursor = ring.open_cursor(true, false).unwrap();
        // (Keeping room evicts what the cursor does not hold: the 16 older events.)
        let kept: Vec<Reservation> = (0..16).map(|_| ring.reserve(1).unwrap()).collect();
        assert_eq!(ring.stats().len, 0);
        assert_eq!(
            ring.reserve(1).unwrap_err(),
            CoreError::RingFull { needed: 1 }
        );
        assert_eq!(append(41, None), Err(CoreError::RingFull { needed: 1 }));
        // Once it is closed, the kept room no longer stands in anyone's way.
        ring.close_cursor(cursor);
        assert_eq!(append(41, None), Ok(41));
        assert_eq!(append(42, Some(&kept[0])), Ok(42));
        drop(kept);
        assert_eq!(ring.stats().len, 2);
        assert!(ring.has_room(16));
    }

    #[test]
    fn a_durable_cursor_opened_while_writes_are_in_flight_leaves_them_their_room() {
        let ring = Arc::new(Ring::new(16).unwrap());
        let append = |version, reservation| append_one(&ring, version, reservation);
        // Prepared before any durable cursor: its room still counts once one opens.
        let early = ring.reserve(1).unwrap();
        let cursor = ring.open_cursor(true, false).unwrap();
        for version in 1..=15 {
            append(version, None).unwrap();
        }
        assert_eq!(append(16, None), Err(CoreError::RingFull { needed: 1 }));
        assert_eq!(append(16, Some(&early)), Ok(16));
        ring.close_cursor(cursor);

        // Reserved under a cursor that then closed, the ring filled meanwhile, and a
        // cursor reopened from the oldest event: the room is made before it pins.
        let kept = {
            let cursor = ring.open_cursor(true, false).unwrap();
            let kept = ring.reserve(1).unwrap();
            ring.close_cursor(cursor);
            kept
        };
        for version in 17..=40 {
            append(version, None).unwrap();
        }
        assert_eq!(ring.stats().len, 16);
        let oldest = ring.open_cursor(true, true).unwrap();
        assert_eq!(ring.stats().len, 15);
        assert_eq!(append(41, None), Err(CoreError::RingFull { needed: 1 }));
        assert_eq!(append(41, Some(&kept)), Ok(41));
        ring.close_cursor(oldest);

        // More in flight than the ring holds: no durable cursor can open until they
        // are done, since it could not leave them their room.
        let many: Vec<Reservation> = (0..17).map(|_| ring.reserve(1).unwrap()).collect();
        assert!(matches!(
            ring.open_cursor(true, false),
            Err(CoreError::Backpressure(_))
        ));
        assert!(ring.open_cursor(false, false).is_ok());
        drop(many);
        assert!(ring.open_cursor(true, false).is_ok());
    }

    #[test]
    fn a_release_and_the_append_it_races_count_the_reservation_once() {
        let ring = Arc::new(Ring::new(16).unwrap());
        let cursor = ring.open_cursor(true, false).unwrap();
        for round in 0..2_000u64 {
            let reservation = Arc::new(ring.reserve(1).unwrap());
            let releaser = {
                let reservation = reservation.clone();
                std::thread::spawn(move || reservation.release())
            };
            let appended = ring.append(
                &state("e", round + 1),
                &None,
                &one(EventKind::StatusChange),
                false,
                Some(&reservation),
            );
            releaser.join().unwrap();
            drop(reservation);
            // Whichever won, nothing stays reserved.
            assert_eq!(ring.inner.lock().reserved, 0, "round {round}");
            if appended.is_ok() {
                ring.read(cursor, 16, None).unwrap();
                ring.commit(cursor, None).unwrap();
            }
        }
    }
}
