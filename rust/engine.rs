//! The engine: the concurrent state map plus the event ring, and the two-phase write.
//!
//! A write is *prepared* (version checked, update validated against the state, next
//! state and encoded events computed: nothing visible) and then *published* (the
//! version compare-and-swap, the ring append and the swap into the map, as one
//! critical section under the execution's slot lock). With no store between the
//! two, `apply` does both under one lock acquisition. A reader never sees a state
//! whose events are not in the ring, nor events whose state is not in the map.
//!
//! Lock order: map shard -> execution slot -> ring. Nothing here calls Python.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use pyo3::prelude::*;
use serde_json::Value;

use crate::errors::CoreError;
use crate::model::{self, EventDraft, ExecStatus, State, Update};
use crate::ring::{Event, HistoryFilter, PendingEvent, Reservation, Ring, VersionLookup};

/// The current time in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// One execution's place in the map. The lock orders its writers; readers take it
/// only long enough to clone an `Arc`.
pub struct ExecSlot {
    current: Mutex<Arc<State>>,
    /// The Python object last handed out for the current state: reads of an unchanged
    /// version return it again instead of allocating (a GC-tracked allocation per read
    /// makes the cyclic GC run every few hundred reads).
    view: Mutex<Option<(Arc<State>, Py<PyAny>)>>,
}

impl ExecSlot {
    fn new(state: Arc<State>) -> Self {
        ExecSlot {
            current: Mutex::new(state),
            view: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<State> {
        self.current.lock().clone()
    }

    /// The current state as a Python object, made by `make` only when the state
    /// changed since the last call. No lock is held while `make` runs.
    pub fn view(
        &self,
        py: Python<'_>,
        make: impl FnOnce(Arc<State>) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let state = self.current();
        if let Some((shown, object)) = &*self.view.lock() {
            if Arc::ptr_eq(shown, &state) {
                return Ok(object.clone_ref(py));
            }
        }
        let object = make(state.clone())?;
        *self.view.lock() = Some((state, object.clone_ref(py)));
        Ok(object)
    }
}

/// An update checked and computed against `base_version` (0: a creation), not yet
/// visible.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub execution_id: Arc<str>,
    pub base_version: u64,
    pub state: Arc<State>,
    pub events: Vec<PendingEvent>,
    pub actor: Option<Arc<str>>,
    /// The ring room its events will take, when it was reserved (`Engine::reserve`).
    pub reservation: Option<Arc<Reservation>>,
}

impl Prepared {
    fn new(
        state: State,
        base_version: u64,
        drafts: Vec<EventDraft>,
        actor: Option<Arc<str>>,
    ) -> Self {
        Prepared {
            execution_id: state.execution_id.clone(),
            base_version,
            state: Arc::new(state),
            events: encode(drafts),
            actor,
            reservation: None,
        }
    }
}

pub struct Engine {
    map: DashMap<Arc<str>, Arc<ExecSlot>>,
    ring: Arc<Ring>,
    creations: AtomicU64,
    closed: AtomicBool,
}

pub fn encode(drafts: Vec<EventDraft>) -> Vec<PendingEvent> {
    drafts
        .into_iter()
        .map(|draft| PendingEvent {
            kind: draft.kind,
            node_id: draft.node_id,
            data: draft.data.into_boxed_slice(),
        })
        .collect()
}

pub fn encode_value(value: &Value) -> Box<[u8]> {
    rmp_serde::to_vec(value)
        .expect("a serde_json::Value always encodes to MessagePack")
        .into_boxed_slice()
}

pub fn decode_value(data: &[u8]) -> Result<Value, CoreError> {
    rmp_serde::from_slice(data)
        .map_err(|e| CoreError::Validation(format!("not an encoded event: {e}")))
}

fn not_found(execution_id: &str) -> CoreError {
    CoreError::NotFound(format!("no execution {execution_id:?}"))
}

impl Engine {
    pub fn new(ring_capacity: usize) -> Result<Self, CoreError> {
        Ok(Engine {
            map: DashMap::new(),
            ring: Arc::new(Ring::new(ring_capacity)?),
            creations: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ring.close();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn check_open(&self) -> Result<(), CoreError> {
        if self.is_closed() {
            return Err(CoreError::Closed("the state manager is closed".into()));
        }
        Ok(())
    }

    pub fn slot(&self, execution_id: &str) -> Result<Arc<ExecSlot>, CoreError> {
        self.check_open()?;
        self.map
            .get(execution_id)
            .map(|entry| entry.value().clone())
            .ok_or_else(|| not_found(execution_id))
    }

    fn check_absent(&self, execution_id: &str) -> Result<(), CoreError> {
        if self.map.contains_key(execution_id) {
            return Err(CoreError::AlreadyExists(format!(
                "execution {execution_id:?} exists already"
            )));
        }
        Ok(())
    }

    /// Phase one of a creation: version 1 and its event, not yet visible.
    pub fn prepare_create(
        &self,
        execution_id: Arc<str>,
        workflow_id: Arc<str>,
        variables: Vec<(Arc<str>, Arc<Value>)>,
        context: Vec<(Arc<str>, Arc<Value>)>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Prepared, CoreError> {
        self.check_open()?;
        self.check_absent(&execution_id)?;
        let created_seq = self.creations.fetch_add(1, Ordering::Relaxed);
        let (state, event) = model::create(
            execution_id,
            workflow_id,
            variables,
            context,
            now,
            created_seq,
        );
        Ok(Prepared::new(state, 0, vec![event], actor))
    }

    /// Phase one of a fork: a new execution starting from `source`, not yet visible.
    pub fn prepare_fork(
        &self,
        source: &State,
        execution_id: Arc<str>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Prepared, CoreError> {
        self.check_open()?;
        self.check_absent(&execution_id)?;
        let created_seq = self.creations.fetch_add(1, Ordering::Relaxed);
        let (state, event) = model::fork(source, execution_id, now, created_seq);
        Ok(Prepared::new(state, 0, vec![event], actor))
    }

    /// Phase one of the source's side of a fork: a version recording the link.
    pub fn prepare_fork_link(
        &self,
        execution_id: &str,
        forked_version: u64,
        new_execution_id: &str,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Prepared, CoreError> {
        let current = self.slot(execution_id)?.current();
        let (next, event) = model::record_fork(&current, forked_version, new_execution_id, now);
        Ok(Prepared::new(next, current.version, vec![event], actor))
    }

    /// Both phases of a creation: the in-memory path.
    pub fn create(
        &self,
        execution_id: Arc<str>,
        workflow_id: Arc<str>,
        variables: Vec<(Arc<str>, Arc<Value>)>,
        context: Vec<(Arc<str>, Arc<Value>)>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Arc<State>, CoreError> {
        let prepared =
            self.prepare_create(execution_id, workflow_id, variables, context, actor, now)?;
        self.publish(&prepared, false)?;
        Ok(prepared.state)
    }

    fn prepare_on(
        current: &Arc<State>,
        update: &Update,
        expected_version: Option<u64>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Prepared, CoreError> {
        if let Some(expected) = expected_version {
            if expected != current.version {
                return Err(CoreError::Conflict {
                    execution_id: current.execution_id.to_string(),
                    expected,
                    actual: current.version,
                });
            }
        }
        let (next, drafts) = model::apply(current, update, now)?;
        Ok(Prepared::new(next, current.version, drafts, actor))
    }

    /// Phase one: check and compute, make nothing visible.
    pub fn prepare(
        &self,
        execution_id: &str,
        update: &Update,
        expected_version: Option<u64>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<Prepared, CoreError> {
        update.check_shape()?;
        let current = self.slot(execution_id)?.current();
        Self::prepare_on(&current, update, expected_version, actor, now)
    }

    /// Keep ring room for `prepared`'s events until it is published (or dropped):
    /// for a write a store commits in between, so that its publication cannot then
    /// fail for want of room. `RingFull` when the room is not there now.
    pub fn reserve(&self, prepared: &mut Prepared) -> Result<(), CoreError> {
        if prepared.reservation.is_none() {
            let reservation = self.ring.reserve(prepared.events.len())?;
            prepared.reservation = Some(Arc::new(reservation));
        }
        Ok(())
    }

    fn append(&self, prepared: &Prepared, persisted: bool) -> Result<u64, CoreError> {
        self.ring.append(
            &prepared.state,
            &prepared.actor,
            &prepared.events,
            persisted,
            prepared.reservation.as_deref(),
        )
    }

    fn publish_locked(
        &self,
        current: &mut Arc<State>,
        prepared: &Prepared,
        persisted: bool,
    ) -> Result<u64, CoreError> {
        if current.version != prepared.base_version {
            return Err(CoreError::Conflict {
                execution_id: prepared.execution_id.to_string(),
                expected: prepared.base_version,
                actual: current.version,
            });
        }
        self.append(prepared, persisted)?;
        *current = prepared.state.clone();
        Ok(prepared.state.version)
    }

    /// Phase two: swap the prepared version in, if its base is still current.
    /// `persisted` says the write path has stored it already (see `Ring`).
    pub fn publish(&self, prepared: &Prepared, persisted: bool) -> Result<u64, CoreError> {
        if prepared.base_version == 0 {
            self.check_open()?;
            // The shard lock is held from the existence check to the insert, so two
            // creators of one id cannot both record an `execution_created` event.
            return match self.map.entry(prepared.execution_id.clone()) {
                Entry::Occupied(_) => Err(CoreError::AlreadyExists(format!(
                    "execution {:?} exists already",
                    &*prepared.execution_id
                ))),
                Entry::Vacant(vacant) => {
                    self.append(prepared, persisted)?;
                    vacant.insert(Arc::new(ExecSlot::new(prepared.state.clone())));
                    Ok(1)
                }
            };
        }
        let slot = self.slot(&prepared.execution_id)?;
        let mut current = slot.current.lock();
        self.publish_locked(&mut current, prepared, persisted)
    }

    /// Publish a version the store has stored already (so `persisted`). When
    /// memory moved on since `prepared` was made (another thread reloaded the
    /// execution), memory is brought to the stored version instead, if it is
    /// behind it, as `refresh` (or `install`) would: the store holds the version,
    /// so memory must not stay without it.
    pub fn publish_stored(&self, prepared: &Prepared) -> Result<u64, CoreError> {
        match self.publish(prepared, true) {
            Err(CoreError::Conflict { .. }) => self
                .refresh((*prepared.state).clone())
                .map(|_| prepared.state.version),
            Err(CoreError::NotFound(_)) => self
                .install((*prepared.state).clone())
                .map(|_| prepared.state.version),
            other => other,
        }
    }

    /// Both phases under one lock: the in-memory write path.
    pub fn apply(
        &self,
        execution_id: &str,
        update: &Update,
        expected_version: Option<u64>,
        actor: Option<Arc<str>>,
        now: i64,
    ) -> Result<u64, CoreError> {
        update.check_shape()?;
        let slot = self.slot(execution_id)?;
        let mut current = slot.current.lock();
        let prepared = Self::prepare_on(&current, update, expected_version, actor, now)?;
        self.publish_locked(&mut current, &prepared, false)
    }

    /// Put a state loaded from a store into the map (if absent); returns what the map
    /// holds afterwards. Its earlier events stay in the store.
    pub fn install(&self, state: State) -> Result<Arc<State>, CoreError> {
        self.check_open()?;
        match self.map.entry(state.execution_id.clone()) {
            Entry::Occupied(occupied) => Ok(occupied.get().current()),
            Entry::Vacant(vacant) => {
                let mut state = state;
                state.created_seq = self.creations.fetch_add(1, Ordering::Relaxed);
                let state = Arc::new(state);
                self.ring
                    .mark_loaded(&state.execution_id, state.version, state.updated_at);
                vacant.insert(Arc::new(ExecSlot::new(state.clone())));
                Ok(state)
            }
        }
    }

    /// Replace an execution's state by a newer one loaded from the store (another
    /// process wrote since). Refuses to go backwards.
    pub fn refresh(&self, state: State) -> Result<Arc<State>, CoreError> {
        let slot = self.slot(&state.execution_id)?;
        let mut current = slot.current.lock();
        if state.version > current.version {
            let mut state = state;
            state.created_seq = current.created_seq;
            let state = Arc::new(state);
            self.ring
                .mark_loaded(&state.execution_id, state.version, state.updated_at);
            *current = state;
        }
        Ok(current.clone())
    }

    /// Reset an execution to `state` (the store's truth after it refused versions the
    /// write-behind held), even backwards. Returns the ring's next sequence number at
    /// the reset: the execution's events below it belong to the refused lineage.
    pub fn replace(&self, state: State) -> Result<u64, CoreError> {
        let slot = self.slot(&state.execution_id)?;
        let mut current = slot.current.lock();
        let mut state = state;
        state.created_seq = current.created_seq;
        let state = Arc::new(state);
        // Under the slot lock no publish of this execution can slip in between.
        let reset_seq =
            self.ring
                .reset_execution(&state.execution_id, state.version, state.updated_at);
        *current = state;
        Ok(reset_seq)
    }

    pub fn get(&self, execution_id: &str) -> Result<Arc<State>, CoreError> {
        Ok(self.slot(execution_id)?.current())
    }

    pub fn get_version(&self, execution_id: &str, version: u64) -> Result<Arc<State>, CoreError> {
        if version == 0 {
            return Err(CoreError::Validation("versions start at 1".into()));
        }
        let current = self.get(execution_id)?;
        if version == current.version {
            return Ok(current);
        }
        if version > current.version {
            return Err(CoreError::NotFound(format!(
                "execution {execution_id:?} has no version {version} (its latest is {})",
                current.version
            )));
        }
        match self.ring.state_at(execution_id, version) {
            VersionLookup::Found(state) => Ok(state),
            VersionLookup::Evicted | VersionLookup::Unknown => {
                Err(CoreError::HistoryEvicted(format!(
                    "version {version} of execution {execution_id:?} is no longer held in memory"
                )))
            }
        }
    }

    /// The matching events of one execution, and its current state (for the summary).
    pub fn history(
        &self,
        execution_id: &str,
        filter: &HistoryFilter,
    ) -> Result<(Vec<Arc<Event>>, Arc<State>), CoreError> {
        let current = self.get(execution_id)?;
        let events = self.ring.history(execution_id, filter)?;
        Ok((events, current))
    }

    /// Current states in creation order.
    pub fn list(
        &self,
        statuses: Option<[bool; ExecStatus::ALL.len()]>,
        workflow_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<State>>, CoreError> {
        self.check_open()?;
        if limit == 0 {
            // The store-backed manager checks its arguments this way: no scan.
            return Ok(Vec::new());
        }
        let mut states: Vec<Arc<State>> = self
            .map
            .iter()
            .map(|entry| entry.value().current())
            .filter(|state| {
                statuses.is_none_or(|wanted| wanted[state.status.index()])
                    && workflow_id.is_none_or(|wf| &*state.workflow_id == wf)
            })
            .collect();
        states.sort_unstable_by_key(|state| state.created_seq);
        states.truncate(limit);
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeStatus;

    #[test]
    fn a_stored_version_reaches_memory_that_moved_on_meanwhile() {
        let engine = Engine::new(1 << 10).unwrap();
        engine
            .create("e".into(), "wf".into(), vec![], vec![], None, 0)
            .unwrap();
        let v1 = engine.get("e").unwrap();
        engine
            .apply("e", &counter_update(1), None, None, now_micros())
            .unwrap();
        // Prepared on version 2; memory is then reset to version 1 (a reload).
        let third = engine
            .prepare("e", &counter_update(2), None, None, now_micros())
            .unwrap();
        engine.replace((*v1).clone()).unwrap();
        assert_eq!(engine.publish_stored(&third).unwrap(), 3);
        assert_eq!(engine.get("e").unwrap().version, 3);
        // Prepared on version 3; memory then moves past it: memory is kept.
        let fourth = engine
            .prepare("e", &counter_update(3), None, None, now_micros())
            .unwrap();
        let mut newer = (*engine.get("e").unwrap()).clone();
        newer.version = 9;
        engine.refresh(newer).unwrap();
        assert_eq!(engine.publish_stored(&fourth).unwrap(), 4);
        assert_eq!(engine.get("e").unwrap().version, 9);
        // Nothing moved: an ordinary publish.
        let fifth = engine
            .prepare("e", &counter_update(4), None, None, now_micros())
            .unwrap();
        assert_eq!(engine.publish_stored(&fifth).unwrap(), 10);
        assert_eq!(engine.get("e").unwrap().version, 10);
    }

    fn counter_update(value: i64) -> Update {
        Update {
            variables: Some(vec![("counter".into(), Arc::new(Value::from(value)))]),
            ..Update::default()
        }
    }

    #[test]
    fn compare_and_swap_loses_no_update_under_threads() {
        let engine = Arc::new(Engine::new(1 << 16).unwrap());
        engine
            .create(
                "e".into(),
                "wf".into(),
                vec![("counter".into(), Arc::new(Value::from(0)))],
                vec![],
                None,
                0,
            )
            .unwrap();
        let threads = 8;
        let per_thread = 2_000;
        let conflicts = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let engine = engine.clone();
                let conflicts = conflicts.clone();
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        loop {
                            let state = engine.get("e").unwrap();
                            let value = state.variables.get("counter").unwrap().as_i64().unwrap();
                            match engine.apply(
                                "e",
                                &counter_update(value + 1),
                                Some(state.version),
                                None,
                                now_micros(),
                            ) {
                                Ok(_) => break,
                                Err(CoreError::Conflict { .. }) => {
                                    conflicts.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(other) => panic!("unexpected {other}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let state = engine.get("e").unwrap();
        let total = threads * per_thread;
        assert_eq!(
            state.variables.get("counter").unwrap().as_i64(),
            Some(total)
        );
        assert_eq!(state.version, total as u64 + 1);
        // Every version's events are in the ring, in version order.
        let events = engine
            .ring()
            .history("e", &HistoryFilter::default())
            .unwrap();
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=total as u64 + 1).collect::<Vec<_>>());
    }

    #[test]
    fn two_phase_publish_rejects_a_stale_base() {
        let engine = Engine::new(64).unwrap();
        engine
            .create("e".into(), "wf".into(), vec![], vec![], None, 0)
            .unwrap();
        let start = Update {
            nodes: Some(vec![("a".into(), NodeStatus::Running)]),
            ..Update::default()
        };
        let first = engine.prepare("e", &start, None, None, 1).unwrap();
        let second = engine
            .prepare("e", &counter_update(1), None, None, 1)
            .unwrap();
        // Nothing is visible before publish.
        assert_eq!(engine.get("e").unwrap().version, 1);
        assert_eq!(engine.publish(&first, false).unwrap(), 2);
        let err = engine.publish(&second, false).unwrap_err();
        assert_eq!(
            err,
            CoreError::Conflict {
                execution_id: "e".into(),
                expected: 1,
                actual: 2
            }
        );
        assert_eq!(engine.get_version("e", 1).unwrap().version, 1);
    }

    #[test]
    fn duplicate_create_records_one_event() {
        let engine = Engine::new(64).unwrap();
        engine
            .create("e".into(), "wf".into(), vec![], vec![], None, 0)
            .unwrap();
        let err = engine
            .create("e".into(), "wf".into(), vec![], vec![], None, 0)
            .unwrap_err();
        assert!(matches!(err, CoreError::AlreadyExists(_)));
        assert_eq!(engine.ring().stats().len, 1);
    }
}
