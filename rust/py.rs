//! The Python classes of `wfstate._core`: thin glue over `Engine` and `Ring`.
//!
//! States and events are handed out as frozen wrappers around shared `Arc`s: cheap
//! to create, impossible to change from Python. Their dict-valued attributes are
//! built fresh at each access, so a caller's edits never reach the store. The GIL
//! is released only around bulk work (history and list scans, waits for the ring),
//! never around an O(1) call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyType};

use crate::batch::PyRecordBatch;
use crate::codec;
use crate::convert::{
    self, datetime_from_micros, event_kind, id_str, json_entries, json_to_py, opt_count,
    opt_datetime, opt_id, parse_update, types, BoundTypes, TYPES,
};
use crate::engine::{decode_value, now_micros, Engine, Prepared};
use crate::errors::CoreError;
use crate::model::{self, EventKind, ExecStatus, JsonEntries, NodeStatus, State};
use crate::ring::{Event, HistoryFilter, Ring};

/// Python's repr of an optional string, for `__repr__`.
fn repr_opt(py: Python<'_>, text: Option<&str>) -> String {
    match text {
        Some(text) => PyString::new(py, text)
            .repr()
            .map_or_else(|_| format!("{text:?}"), |r| r.to_string()),
        None => "None".into(),
    }
}

/// A state's fork link as Python sees it: `(execution_id, version)` or None.
fn fork_link(state: &State) -> Option<(String, u64)> {
    state
        .forked_from
        .as_ref()
        .map(|(id, version)| (id.to_string(), *version))
}

fn member<'py>(py: Python<'py>, members: &[Py<PyAny>], index: usize) -> Bound<'py, PyAny> {
    members[index].bind(py).clone()
}

fn opt_text<'py>(py: Python<'py>, text: &Option<Arc<str>>) -> Bound<'py, PyAny> {
    match text {
        Some(text) => PyString::new(py, text).into_any(),
        None => py.None().into_bound(py),
    }
}

fn iso(py: Python<'_>, micros: Option<i64>) -> PyResult<Py<PyAny>> {
    match micros {
        Some(micros) => Ok(datetime_from_micros(py, micros)?
            .call_method0("isoformat")?
            .unbind()),
        None => Ok(py.None()),
    }
}

fn json_map_to_py<'py>(py: Python<'py>, map: &model::JsonMap) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (key, value) in map.iter() {
        dict.set_item(&**key, json_to_py(py, value)?)?;
    }
    Ok(dict)
}

// -- NodeState -----------------------------------------------------------------------

/// The state of one node of an execution. Immutable.
#[pyclass(frozen, module = "wfstate._core", name = "NodeState")]
pub struct PyNodeState {
    node: Arc<model::NodeState>,
}

#[pymethods]
impl PyNodeState {
    #[getter]
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(member(
            py,
            &types(py)?.node_status,
            self.node.status.index(),
        ))
    }

    #[getter]
    fn attempts(&self) -> u32 {
        self.node.attempts
    }

    #[getter]
    fn started_at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        opt_datetime(py, self.node.started_at)
    }

    #[getter]
    fn finished_at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        opt_datetime(py, self.node.finished_at)
    }

    /// The failure record of the latest attempt while the node is failed (a copy).
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.node.error {
            Some(error) => json_to_py(py, error),
            None => Ok(py.None().into_bound(py)),
        }
    }

    /// A JSON-ready dict: status as its value, times as ISO-8601 strings.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("status", self.node.status.as_str())?;
        dict.set_item("attempts", self.node.attempts)?;
        dict.set_item("started_at", iso(py, self.node.started_at)?)?;
        dict.set_item("finished_at", iso(py, self.node.finished_at)?)?;
        dict.set_item("error", self.error(py)?)?;
        Ok(dict)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyNodeState>()
            .is_ok_and(|other| other.get().node == self.node)
    }

    fn __ne__(&self, other: &Bound<'_, PyAny>) -> bool {
        !self.__eq__(other)
    }

    fn __repr__(&self) -> String {
        format!(
            "NodeState(status={}, attempts={})",
            self.node.status.as_str(),
            self.node.attempts
        )
    }
}

// -- WorkflowState -------------------------------------------------------------------

/// One version of an execution's state. Immutable: `nodes`, `variables` and
/// `context` are fresh copies at every access.
#[pyclass(frozen, module = "wfstate._core", name = "WorkflowState")]
pub struct PyWorkflowState {
    pub state: Arc<State>,
}

fn same_observable_state(a: &State, b: &State) -> bool {
    a.execution_id == b.execution_id
        && a.workflow_id == b.workflow_id
        && a.status == b.status
        && a.current_node == b.current_node
        && a.nodes == b.nodes
        && a.variables == b.variables
        && a.context == b.context
        && a.version == b.version
        && a.created_at == b.created_at
        && a.updated_at == b.updated_at
}

#[pymethods]
impl PyWorkflowState {
    #[getter]
    fn execution_id(&self) -> &str {
        &self.state.execution_id
    }

    #[getter]
    fn workflow_id(&self) -> &str {
        &self.state.workflow_id
    }

    #[getter]
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(member(
            py,
            &types(py)?.exec_status,
            self.state.status.index(),
        ))
    }

    #[getter]
    fn current_node<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        opt_text(py, &self.state.current_node)
    }

    #[getter]
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (node_id, node) in self.state.nodes.iter() {
            dict.set_item(&**node_id, PyNodeState { node: node.clone() })?;
        }
        Ok(dict)
    }

    #[getter]
    fn variables<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        json_map_to_py(py, &self.state.variables)
    }

    #[getter]
    fn context<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        json_map_to_py(py, &self.state.context)
    }

    #[getter]
    fn version(&self) -> u64 {
        self.state.version
    }

    /// Error events ever recorded for this execution.
    #[getter]
    fn error_count(&self) -> u64 {
        self.state.error_count
    }

    /// `(execution_id, version)` this execution was forked from, or None.
    #[getter]
    fn forked_from(&self) -> Option<(String, u64)> {
        fork_link(&self.state)
    }

    #[getter]
    fn created_at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(datetime_from_micros(py, self.state.created_at)?.into_any())
    }

    #[getter]
    fn updated_at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(datetime_from_micros(py, self.state.updated_at)?.into_any())
    }

    /// A JSON-ready dict: enums as their values, times as ISO-8601 strings.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = &self.state;
        let dict = PyDict::new(py);
        dict.set_item("execution_id", &*state.execution_id)?;
        dict.set_item("workflow_id", &*state.workflow_id)?;
        dict.set_item("status", state.status.as_str())?;
        dict.set_item("current_node", opt_text(py, &state.current_node))?;
        let nodes = PyDict::new(py);
        for (node_id, node) in state.nodes.iter() {
            nodes.set_item(&**node_id, PyNodeState { node: node.clone() }.to_dict(py)?)?;
        }
        dict.set_item("nodes", nodes)?;
        dict.set_item("variables", json_map_to_py(py, &state.variables)?)?;
        dict.set_item("context", json_map_to_py(py, &state.context)?)?;
        dict.set_item("version", state.version)?;
        dict.set_item("created_at", iso(py, Some(state.created_at))?)?;
        dict.set_item("updated_at", iso(py, Some(state.updated_at))?)?;
        Ok(dict)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyWorkflowState>()
            .is_ok_and(|other| same_observable_state(&other.get().state, &self.state))
    }

    fn __ne__(&self, other: &Bound<'_, PyAny>) -> bool {
        !self.__eq__(other)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = &self.state;
        format!(
            "WorkflowState(execution_id={}, workflow_id={}, status={}, version={}, current_node={}, nodes={}, variables={})",
            repr_opt(py, Some(&state.execution_id)),
            repr_opt(py, Some(&state.workflow_id)),
            state.status.as_str(),
            state.version,
            repr_opt(py, state.current_node.as_deref()),
            state.nodes.len(),
            state.variables.len()
        )
    }
}

// -- StateEvent ----------------------------------------------------------------------

/// One recorded change. Immutable: `data` is decoded afresh at every access.
#[pyclass(frozen, module = "wfstate._core", name = "StateEvent")]
pub struct PyStateEvent {
    event: Arc<Event>,
}

#[pymethods]
impl PyStateEvent {
    /// The global sequence number: the order of all events of the manager.
    #[getter]
    fn seq(&self) -> u64 {
        self.event.seq
    }

    #[getter]
    fn execution_id(&self) -> &str {
        &self.event.execution_id
    }

    #[getter]
    fn version(&self) -> u64 {
        self.event.version
    }

    #[getter]
    fn timestamp<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(datetime_from_micros(py, self.event.timestamp)?.into_any())
    }

    #[getter]
    fn r#type<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(member(py, &types(py)?.event_type, self.event.kind.index()))
    }

    #[getter]
    fn node_id<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        opt_text(py, &self.event.node_id)
    }

    #[getter]
    fn actor<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        opt_text(py, &self.event.actor)
    }

    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &decode_value(&self.event.data)?)
    }

    /// The event's data as the core stores it: MessagePack bytes.
    #[getter]
    fn encoded_data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.event.data)
    }

    /// A JSON-ready dict: the type as its value, the timestamp as ISO-8601.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let event = &self.event;
        let dict = PyDict::new(py);
        dict.set_item("seq", event.seq)?;
        dict.set_item("execution_id", &*event.execution_id)?;
        dict.set_item("version", event.version)?;
        dict.set_item("timestamp", iso(py, Some(event.timestamp))?)?;
        dict.set_item("type", event.kind.as_str())?;
        dict.set_item("node_id", opt_text(py, &event.node_id))?;
        dict.set_item("actor", opt_text(py, &event.actor))?;
        dict.set_item("data", self.data(py)?)?;
        Ok(dict)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyStateEvent>()
            .is_ok_and(|other| *other.get().event == *self.event)
    }

    fn __ne__(&self, other: &Bound<'_, PyAny>) -> bool {
        !self.__eq__(other)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let event = &self.event;
        format!(
            "StateEvent(seq={}, execution_id={}, version={}, type={}, node_id={})",
            event.seq,
            repr_opt(py, Some(&event.execution_id)),
            event.version,
            event.kind.as_str(),
            repr_opt(py, event.node_id.as_deref())
        )
    }
}

fn events_to_py(py: Python<'_>, events: Vec<Arc<Event>>) -> PyResult<Vec<Py<PyStateEvent>>> {
    events
        .into_iter()
        .map(|event| Py::new(py, PyStateEvent { event }))
        .collect()
}

// -- PreparedUpdate ------------------------------------------------------------------

/// What a store writes for a prepared version.
pub(crate) fn version_record(prepared: &Prepared) -> PyVersionRecord {
    PyVersionRecord::new(
        prepared.state.clone(),
        prepared.base_version,
        prepared.actor.clone(),
        prepared
            .events
            .iter()
            .map(|e| (e.kind, e.node_id.clone(), &*e.data)),
        0,
    )
}

/// An update checked and computed, not yet visible. Publish it with `Core.publish`.
///
/// It keeps ring room for its events until published (while a durable cursor is
/// open, `Core.prepare*` wait for that room, or raise `BackpressureError`, as a
/// publish would); `release()` gives the room back when it will not be published.
#[pyclass(frozen, module = "wfstate._core", name = "PreparedUpdate")]
pub struct PyPreparedUpdate {
    prepared: Prepared,
}

#[pymethods]
impl PyPreparedUpdate {
    #[getter]
    fn execution_id(&self) -> &str {
        &self.prepared.execution_id
    }

    #[getter]
    fn base_version(&self) -> u64 {
        self.prepared.base_version
    }

    #[getter]
    fn version(&self) -> u64 {
        self.prepared.state.version
    }

    #[getter]
    fn state(&self) -> PyWorkflowState {
        PyWorkflowState {
            state: self.prepared.state.clone(),
        }
    }

    /// What a store writes for this version.
    fn record(&self) -> PyVersionRecord {
        version_record(&self.prepared)
    }

    /// Give back the ring room kept for this version's events, when it will not be
    /// published (its write failed or was refused). Idempotent; dropping the object
    /// does the same.
    fn release(&self) {
        if let Some(reservation) = &self.prepared.reservation {
            reservation.release();
        }
    }

    /// The events the update will record; their `seq` is 0 until published.
    #[getter]
    fn events(&self, py: Python<'_>) -> PyResult<Vec<Py<PyStateEvent>>> {
        let state = &self.prepared.state;
        let events = self
            .prepared
            .events
            .iter()
            .map(|pending| {
                Arc::new(Event {
                    seq: 0,
                    execution_id: self.prepared.execution_id.clone(),
                    version: state.version,
                    timestamp: state.updated_at,
                    kind: pending.kind,
                    node_id: pending.node_id.clone(),
                    actor: self.prepared.actor.clone(),
                    data: pending.data.clone(),
                })
            })
            .collect();
        events_to_py(py, events)
    }
}

// -- EventCursor ---------------------------------------------------------------------

/// A reader of the event ring with its own position.
#[pyclass(frozen, module = "wfstate._core", name = "EventCursor")]
pub struct PyEventCursor {
    ring: Arc<Ring>,
    id: u64,
    durable: bool,
    closed: AtomicBool,
}

impl PyEventCursor {
    fn read_versions(
        &self,
        py: Python<'_>,
        max_events: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<PyVersionRecord>> {
        let id = self.open_id()?;
        let deadline = timeout.map(|t| deadline_after(t, "timeout")).transpose()?;
        Ok(py.detach(|| self.versions_until(id, max_events, deadline))?)
    }

    /// Whole versions not yet persisted, from up to `max_events` events (waiting for
    /// the first until `deadline`). Needs no GIL.
    fn versions_until(
        &self,
        id: u64,
        max_events: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<PyVersionRecord>, CoreError> {
        let slots = self.ring.read_slots(id, max_events, deadline)?;
        let mut records = Vec::new();
        let mut start = 0;
        while start < slots.len() {
            let first = &slots[start].event;
            let mut end = start + 1;
            while end < slots.len()
                && slots[end].event.version == first.version
                && slots[end].event.execution_id == first.execution_id
            {
                end += 1;
            }
            let group = &slots[start..end];
            if !group.iter().all(|slot| slot.persisted) {
                let state = group[0].state.clone();
                let base = if first.kind == EventKind::ExecutionCreated {
                    0
                } else {
                    first.version - 1
                };
                records.push(PyVersionRecord::new(
                    state,
                    base,
                    first.actor.clone(),
                    group.iter().map(|slot| {
                        (
                            slot.event.kind,
                            slot.event.node_id.clone(),
                            &*slot.event.data,
                        )
                    }),
                    group[end - start - 1].event.seq,
                ));
            }
            start = end;
        }
        Ok(records)
    }

    /// `read_batch` for a caller that has let go of the GIL already: the timeout
    /// checked (`deadline_for`) and the cursor's id (`open_id`) in hand.
    pub(crate) fn batch_until(
        &self,
        id: u64,
        max_events: usize,
        deadline: Option<Instant>,
        skip_before: Option<&HashMap<String, u64>>,
    ) -> Result<PyRecordBatch, CoreError> {
        let mut records = self.versions_until(id, max_events, deadline)?;
        let mut dropped = 0;
        if let Some(skip) = skip_before.filter(|skip| !skip.is_empty()) {
            let before = records.len();
            records.retain(|record| {
                skip.get(&*record.state.execution_id)
                    .is_none_or(|reset_seq| record.last_seq >= *reset_seq)
            });
            dropped = before - records.len();
        }
        Ok(PyRecordBatch::new(records, dropped))
    }

    /// `position` for a caller that has let go of the GIL already.
    pub(crate) fn position_of(&self, id: u64) -> Result<u64, CoreError> {
        Ok(self.ring.cursor_info(id)?.0)
    }

    /// `commit()` for a caller that has let go of the GIL already.
    pub(crate) fn commit_read(&self, id: u64) -> Result<(), CoreError> {
        self.ring.commit(id, None)
    }

    pub(crate) fn open_id(&self) -> Result<u64, CoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CoreError::Closed("the event cursor is closed".into()));
        }
        Ok(self.id)
    }
}

impl Drop for PyEventCursor {
    fn drop(&mut self) {
        // A forgotten durable cursor must not hold back eviction forever.
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.ring.close_cursor(self.id);
        }
    }
}

#[pymethods]
impl PyEventCursor {
    /// The sequence number of the next event `read` returns.
    #[getter]
    fn position(&self) -> PyResult<u64> {
        Ok(self.ring.cursor_info(self.open_id()?)?.0)
    }

    /// Every event below this sequence number has been taken.
    #[getter]
    fn committed(&self) -> PyResult<u64> {
        Ok(self.ring.cursor_info(self.open_id()?)?.1)
    }

    #[getter]
    fn durable(&self) -> bool {
        self.durable
    }

    /// Events a live cursor skipped because it fell behind the ring.
    #[getter]
    fn missed(&self) -> PyResult<u64> {
        Ok(self.ring.cursor_info(self.open_id()?)?.2)
    }

    /// Up to `max_events` next events; waits up to `timeout` seconds when there are none.
    #[pyo3(signature = (max_events = 1000, timeout = None))]
    fn read(
        &self,
        py: Python<'_>,
        max_events: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Py<PyStateEvent>>> {
        let id = self.open_id()?;
        let deadline = timeout.map(|t| deadline_after(t, "timeout")).transpose()?;
        let events = match deadline {
            // Waiting: let other threads (the writers we wait for) run.
            Some(deadline) => py.detach(|| self.ring.read(id, max_events, Some(deadline)))?,
            None => self.ring.read(id, max_events, None)?,
        };
        events_to_py(py, events)
    }

    /// The next whole versions, as store records, leaving out those the write path
    /// stored already; `commit()` once they are stored.
    #[pyo3(signature = (max_events = 1000, timeout = None))]
    fn read_records(
        &self,
        py: Python<'_>,
        max_events: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<PyVersionRecord>> {
        self.read_versions(py, max_events, timeout)
    }

    /// The same versions as `read_records`, kept in Rust as one `RecordBatch` that
    /// encodes a store's parameters for all of them at once. Versions of an execution
    /// in `skip_before` whose last event precedes the given sequence number are left
    /// out (a lineage the store refused) and counted in `dropped`.
    #[pyo3(signature = (max_events = 1000, timeout = None, skip_before = None))]
    fn read_batch(
        &self,
        py: Python<'_>,
        max_events: usize,
        timeout: Option<f64>,
        skip_before: Option<HashMap<String, u64>>,
    ) -> PyResult<PyRecordBatch> {
        let id = self.open_id()?;
        let deadline = timeout.map(|t| deadline_after(t, "timeout")).transpose()?;
        Ok(py.detach(|| self.batch_until(id, max_events, deadline, skip_before.as_ref()))?)
    }

    /// Mark events up to `seq` (default: all read so far) as taken.
    #[pyo3(signature = (seq = None))]
    fn commit(&self, seq: Option<u64>) -> PyResult<()> {
        Ok(self.ring.commit(self.open_id()?, seq)?)
    }

    /// Stop reading; a durable cursor stops holding back eviction. Idempotent.
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.ring.close_cursor(self.id);
        }
    }
}

/// `Core.apply_unless`'s mask: an update that sets the status.
pub const CRITICAL_STATUS: u32 = 1;
/// An update that moves a node to `failed`.
pub const CRITICAL_NODE_FAILED: u32 = 2;
/// An update that records an error.
pub const CRITICAL_ERROR: u32 = 4;
/// An update that names at least one node (`nodes`).
pub const CRITICAL_NODES: u32 = 8;
/// Every update.
pub const CRITICAL_ALL: u32 = 16;

/// Whether `update` is critical by the mask (see `Core.apply_unless`).
fn is_critical(update: &model::Update, critical: u32) -> bool {
    if critical == 0 {
        return false;
    }
    let nodes = update.nodes.as_deref().unwrap_or_default();
    critical & CRITICAL_ALL != 0
        || (critical & CRITICAL_STATUS != 0 && update.status.is_some())
        || (critical & CRITICAL_ERROR != 0 && update.error.is_some())
        || (critical & CRITICAL_NODES != 0 && !nodes.is_empty())
        || (critical & CRITICAL_NODE_FAILED != 0
            && nodes
                .iter()
                .any(|(_, status)| *status == NodeStatus::Failed))
}

pub(crate) fn deadline_after(seconds: f64, what: &str) -> Result<Instant, CoreError> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(CoreError::Validation(format!(
            "{what} must be a non-negative number of seconds, not {seconds}"
        )));
    }
    let wait = Duration::from_secs_f64(seconds.min(1e9));
    Ok(Instant::now() + wait)
}

// -- Core ----------------------------------------------------------------------------

/// The concurrent state map and event ring. Use `wfstate.StateManager` instead.
#[pyclass(frozen, module = "wfstate._core", name = "Core")]
pub struct PyCore {
    engine: Engine,
    block_on_full: bool,
    ring_full_timeout: f64,
    max_update_bytes: usize,
}

impl PyCore {
    /// `prepare`'s work, for the native writers' one-call sync path too.
    pub(crate) fn prepared(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Prepared> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let (update, expected_version, actor) =
            self.update_args(py, execution_id, update, expected_version, actor)?;
        let prepared =
            self.engine
                .prepare(execution_id, &update, expected_version, actor, now_micros())?;
        self.reserved(py, prepared)
    }

    /// `prepared` with its ring room reserved, waiting for room as a publish would
    /// (`on_ring_full`): a store may commit it before it is published, and then
    /// the publish must not fail for want of room.
    fn reserved(&self, py: Python<'_>, mut prepared: Prepared) -> PyResult<Prepared> {
        self.with_room(py, || self.engine.reserve(&mut prepared))?;
        Ok(prepared)
    }

    /// Publish a version the store has stored already. When memory moved on
    /// meanwhile (another thread reloaded the execution), memory is brought to
    /// the stored version instead, if it is behind it (as `refresh` or `install`
    /// would): the store holds the version, so memory must not stay without it.
    pub(crate) fn publish_stored(&self, py: Python<'_>, prepared: &Prepared) -> PyResult<u64> {
        self.with_room(py, || self.engine.publish_stored(prepared))
    }

    /// Run `attempt` until the ring has room for its events (or give up).
    fn with_room<T>(
        &self,
        py: Python<'_>,
        mut attempt: impl FnMut() -> Result<T, CoreError>,
    ) -> PyResult<T> {
        let mut deadline: Option<Instant> = None;
        loop {
            match attempt() {
                Err(CoreError::RingFull { needed }) => {
                    if !self.block_on_full {
                        return Err(CoreError::Backpressure(format!(
                            "{} (on_ring_full='error')",
                            CoreError::RingFull { needed }
                        ))
                        .into());
                    }
                    let deadline = *deadline.get_or_insert_with(|| {
                        Instant::now() + Duration::from_secs_f64(self.ring_full_timeout)
                    });
                    let ring = self.engine.ring();
                    let has_room = py.detach(|| ring.wait_for_room(needed, deadline));
                    if self.engine.is_closed() {
                        return Err(CoreError::Closed("the state manager is closed".into()).into());
                    }
                    if !has_room {
                        return Err(CoreError::Backpressure(format!(
                            "{} after waiting {}s (ring_full_timeout)",
                            CoreError::RingFull { needed },
                            self.ring_full_timeout
                        ))
                        .into());
                    }
                }
                other => return Ok(other?),
            }
        }
    }
}

type CreationArgs = (
    Arc<str>,
    Arc<str>,
    JsonEntries,
    JsonEntries,
    Option<Arc<str>>,
);

impl PyCore {
    fn creation_args(
        &self,
        execution_id: Option<&Bound<'_, PyAny>>,
        workflow_id: &Bound<'_, PyAny>,
        variables: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> Result<CreationArgs, CoreError> {
        let execution_id = new_id(execution_id)?;
        let workflow_id: Arc<str> = Arc::from(id_str(workflow_id, "workflow_id")?);
        let mut size = 0;
        let variables = json_entries(variables, "variables", &mut size)?.unwrap_or_default();
        let context = json_entries(context, "context", &mut size)?.unwrap_or_default();
        convert::check_size(size, self.max_update_bytes)?;
        let actor = opt_id(actor, "actor")?;
        Ok((execution_id, workflow_id, variables, context, actor))
    }
}

/// `(duration in µs, node count, error count)` of an execution, for `HistorySummary`.
type HistorySummaryParts = (u64, usize, u64);

fn history_filter(
    since_us: Option<i64>,
    until_us: Option<i64>,
    types: Option<&Bound<'_, PyAny>>,
    node_id: Option<&Bound<'_, PyAny>>,
    after_version: Option<&Bound<'_, PyAny>>,
    limit: Option<&Bound<'_, PyAny>>,
) -> PyResult<HistoryFilter> {
    let kinds = match types.filter(|t| !t.is_none()) {
        None => None,
        Some(types) => {
            let mut kinds = [false; EventKind::ALL.len()];
            for kind in types.try_iter()? {
                kinds[event_kind(&kind?)?.index()] = true;
            }
            Some(kinds)
        }
    };
    Ok(HistoryFilter {
        since: since_us,
        until: until_us,
        kinds,
        node_id: opt_id(node_id, "node_id")?.map(|n| n.to_string()),
        after_version: opt_count(after_version, "after_version")?,
        limit: opt_count(limit, "limit")?.map(|l| l as usize),
    })
}

/// The given execution id, or a new time-ordered UUIDv7 when None.
fn new_id(execution_id: Option<&Bound<'_, PyAny>>) -> Result<Arc<str>, CoreError> {
    Ok(match execution_id.filter(|v| !v.is_none()) {
        Some(id) => Arc::from(id_str(id, "execution_id")?),
        None => Arc::from(new_execution_id()),
    })
}

fn expected(value: Option<&Bound<'_, PyAny>>) -> Result<Option<u64>, CoreError> {
    let expected = opt_count(value, "expected_version")?;
    if expected == Some(0) {
        return Err(CoreError::Validation(
            "expected_version: versions start at 1".into(),
        ));
    }
    Ok(expected)
}

type UpdateArgs = (model::Update, Option<u64>, Option<Arc<str>>);

impl PyCore {
    /// The checked arguments of `apply` and `prepare`, in the order of the contract.
    fn update_args(
        &self,
        py: Python<'_>,
        execution_id: &str,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<UpdateArgs> {
        let args = self.stateless_args(py, update, expected_version, actor)?;
        self.check_huge_expected(execution_id, expected_version, args.1)?;
        Ok(args)
    }

    /// `update_args` without the check that needs the execution's state.
    fn stateless_args(
        &self,
        py: Python<'_>,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<UpdateArgs> {
        let update = parse_update(py, update, self.max_update_bytes)?;
        let checked = expected(expected_version)?;
        let actor = opt_id(actor, "actor")?;
        Ok((update, checked, actor))
    }

    /// Apply checked arguments (waiting for room in the ring as configured).
    fn apply_args(
        &self,
        py: Python<'_>,
        execution_id: &str,
        (update, expected_version, actor): UpdateArgs,
    ) -> PyResult<u64> {
        self.with_room(py, || {
            self.engine.apply(
                execution_id,
                &update,
                expected_version,
                actor.clone(),
                now_micros(),
            )
        })
    }

    /// An `expected_version` beyond 64 bits can never match: once the execution is
    /// known to exist, it is a conflict that reports the caller's number as given.
    fn check_huge_expected(
        &self,
        execution_id: &str,
        value: Option<&Bound<'_, PyAny>>,
        expected: Option<u64>,
    ) -> PyResult<()> {
        let Some(value) = value else { return Ok(()) };
        if expected != Some(u64::MAX) || value.extract::<u64>().is_ok() {
            return Ok(());
        }
        let actual = self.engine.get(execution_id)?.version;
        Err(crate::errors::conflict_error(
            value.py(),
            execution_id,
            value,
            actual,
        ))
    }
}

#[pymethods]
impl PyCore {
    #[new]
    #[pyo3(signature = (*, ring_capacity = 100_000, block_on_full = true, ring_full_timeout = 5.0, max_update_bytes = 1_048_576))]
    fn new(
        ring_capacity: usize,
        block_on_full: bool,
        ring_full_timeout: f64,
        max_update_bytes: usize,
    ) -> PyResult<Self> {
        deadline_after(ring_full_timeout, "ring_full_timeout")?;
        if max_update_bytes == 0 {
            return Err(CoreError::Validation("max_update_bytes must be positive".into()).into());
        }
        Ok(PyCore {
            engine: Engine::new(ring_capacity)?,
            block_on_full,
            ring_full_timeout,
            max_update_bytes,
        })
    }

    #[pyo3(signature = (execution_id, workflow_id, variables = None, context = None, actor = None))]
    fn create(
        &self,
        py: Python<'_>,
        execution_id: Option<&Bound<'_, PyAny>>,
        workflow_id: &Bound<'_, PyAny>,
        variables: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyWorkflowState> {
        let (execution_id, workflow_id, variables, context, actor) =
            self.creation_args(execution_id, workflow_id, variables, context, actor)?;
        let state = self.with_room(py, || {
            self.engine.create(
                execution_id.clone(),
                workflow_id.clone(),
                variables.clone(),
                context.clone(),
                actor.clone(),
                now_micros(),
            )
        })?;
        Ok(PyWorkflowState { state })
    }

    #[pyo3(signature = (execution_id, update, expected_version = None, actor = None))]
    fn apply(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let args = self.update_args(py, execution_id, update, expected_version, actor)?;
        self.apply_args(py, execution_id, args)
    }

    /// `apply`, unless the update is critical by `critical` (a mask of
    /// `CRITICAL_STATUS`, `CRITICAL_NODE_FAILED`, `CRITICAL_ERROR`, `CRITICAL_NODES`,
    /// `CRITICAL_ALL`): then nothing is applied and None is returned, after the
    /// checks that need no state (the update's shape, types and size,
    /// `expected_version`, `actor`). For the write-behind, whose critical updates
    /// are written synchronously instead.
    #[pyo3(signature = (execution_id, update, expected_version = None, actor = None, critical = 0))]
    fn apply_unless(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
        critical: u32,
    ) -> PyResult<Option<u64>> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let args = self.stateless_args(py, update, expected_version, actor)?;
        if is_critical(&args.0, critical) {
            return Ok(None);
        }
        self.check_huge_expected(execution_id, expected_version, args.1)?;
        self.apply_args(py, execution_id, args).map(Some)
    }

    #[pyo3(signature = (execution_id, update, expected_version = None, actor = None))]
    fn prepare(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        update: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPreparedUpdate> {
        Ok(PyPreparedUpdate {
            prepared: self.prepared(py, execution_id, update, expected_version, actor)?,
        })
    }

    #[pyo3(signature = (prepared, *, persisted = true))]
    fn publish(
        &self,
        py: Python<'_>,
        prepared: &PyPreparedUpdate,
        persisted: bool,
    ) -> PyResult<u64> {
        self.with_room(py, || self.engine.publish(&prepared.prepared, persisted))
    }

    #[pyo3(signature = (execution_id, workflow_id, variables = None, context = None, actor = None))]
    fn prepare_create(
        &self,
        py: Python<'_>,
        execution_id: Option<&Bound<'_, PyAny>>,
        workflow_id: &Bound<'_, PyAny>,
        variables: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPreparedUpdate> {
        let (execution_id, workflow_id, variables, context, actor) =
            self.creation_args(execution_id, workflow_id, variables, context, actor)?;
        let prepared = self.engine.prepare_create(
            execution_id,
            workflow_id,
            variables,
            context,
            actor,
            now_micros(),
        )?;
        let prepared = self.reserved(py, prepared)?;
        Ok(PyPreparedUpdate { prepared })
    }

    #[pyo3(signature = (source, new_execution_id = None, actor = None))]
    fn prepare_fork(
        &self,
        py: Python<'_>,
        source: &PyWorkflowState,
        new_execution_id: Option<&Bound<'_, PyAny>>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPreparedUpdate> {
        let execution_id = new_id(new_execution_id)?;
        let actor = opt_id(actor, "actor")?;
        let prepared =
            self.engine
                .prepare_fork(&source.state, execution_id, actor, now_micros())?;
        let prepared = self.reserved(py, prepared)?;
        Ok(PyPreparedUpdate { prepared })
    }

    #[pyo3(signature = (execution_id, forked_version, new_execution_id, actor = None))]
    fn prepare_fork_link(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        forked_version: u64,
        new_execution_id: &Bound<'_, PyAny>,
        actor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyPreparedUpdate> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let new_execution_id = id_str(new_execution_id, "new_execution_id")?;
        let actor = opt_id(actor, "actor")?;
        let prepared = self.engine.prepare_fork_link(
            execution_id,
            forked_version,
            new_execution_id,
            actor,
            now_micros(),
        )?;
        let prepared = self.reserved(py, prepared)?;
        Ok(PyPreparedUpdate { prepared })
    }

    /// Put a state loaded from a store into the map, unless one is there already.
    fn install(&self, state: &PyWorkflowState) -> PyResult<PyWorkflowState> {
        Ok(PyWorkflowState {
            state: self.engine.install(State::clone(&state.state))?,
        })
    }

    /// Move an execution forward to a newer state loaded from the store.
    fn refresh(&self, state: &PyWorkflowState) -> PyResult<PyWorkflowState> {
        Ok(PyWorkflowState {
            state: self.engine.refresh(State::clone(&state.state))?,
        })
    }

    /// Reset an execution to a state loaded from the store, even backwards; returns the
    /// ring sequence number from which its events follow the new state.
    fn replace(&self, state: &PyWorkflowState) -> PyResult<u64> {
        Ok(self.engine.replace(State::clone(&state.state))?)
    }

    fn get(&self, py: Python<'_>, execution_id: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let execution_id = id_str(execution_id, "execution_id")?;
        self.engine.slot(execution_id)?.view(py, |state| {
            Ok(Py::new(py, PyWorkflowState { state })?.into_any())
        })
    }

    fn get_version(
        &self,
        execution_id: &Bound<'_, PyAny>,
        version: &Bound<'_, PyAny>,
    ) -> PyResult<PyWorkflowState> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let version = opt_count(Some(version), "version")?.unwrap_or(0);
        Ok(PyWorkflowState {
            state: self.engine.get_version(execution_id, version)?,
        })
    }

    #[pyo3(signature = (execution_id, since_us = None, until_us = None, types = None, node_id = None, after_version = None, limit = None))]
    #[allow(clippy::too_many_arguments)]
    fn history(
        &self,
        py: Python<'_>,
        execution_id: &Bound<'_, PyAny>,
        since_us: Option<i64>,
        until_us: Option<i64>,
        types: Option<&Bound<'_, PyAny>>,
        node_id: Option<&Bound<'_, PyAny>>,
        after_version: Option<&Bound<'_, PyAny>>,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Vec<Py<PyStateEvent>>, HistorySummaryParts)> {
        let execution_id = id_str(execution_id, "execution_id")?;
        let filter = history_filter(since_us, until_us, types, node_id, after_version, limit)?;
        let (events, state) = py.detach(|| self.engine.history(execution_id, &filter))?;
        let summary = (
            (state.updated_at - state.created_at) as u64,
            state.nodes.len(),
            state.error_count,
        );
        Ok((events_to_py(py, events)?, summary))
    }

    #[pyo3(signature = (statuses = None, workflow_id = None, limit = None))]
    fn list(
        &self,
        py: Python<'_>,
        statuses: Option<&Bound<'_, PyAny>>,
        workflow_id: Option<&Bound<'_, PyAny>>,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyWorkflowState>> {
        let wanted = match statuses.filter(|s| !s.is_none()) {
            None => None,
            Some(statuses) => {
                let mut wanted = [false; ExecStatus::ALL.len()];
                for status in statuses.try_iter()? {
                    wanted[convert::exec_status(&status?, "status")?.index()] = true;
                }
                Some(wanted)
            }
        };
        let workflow_id = opt_id(workflow_id, "workflow_id")?;
        let limit = opt_count(limit, "limit")?.map_or(usize::MAX, |l| l as usize);
        let states = py.detach(|| self.engine.list(wanted, workflow_id.as_deref(), limit))?;
        Ok(states
            .into_iter()
            .map(|state| PyWorkflowState { state })
            .collect())
    }

    #[pyo3(signature = (*, durable = false, from_oldest = false))]
    fn open_cursor(&self, durable: bool, from_oldest: bool) -> PyResult<PyEventCursor> {
        if self.engine.is_closed() {
            return Err(CoreError::Closed("the state manager is closed".into()).into());
        }
        let ring = self.engine.ring().clone();
        let id = ring.open_cursor(durable, from_oldest)?;
        Ok(PyEventCursor {
            ring,
            id,
            durable,
            closed: AtomicBool::new(false),
        })
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.engine.check_open()?;
        let ring = self.engine.ring().stats();
        let dict = PyDict::new(py);
        dict.set_item("executions", self.engine.len())?;
        dict.set_item("ring_events", ring.len)?;
        dict.set_item("ring_capacity", ring.capacity)?;
        dict.set_item("first_seq", ring.first_seq)?;
        dict.set_item("next_seq", ring.next_seq)?;
        dict.set_item("cursors", ring.cursors)?;
        dict.set_item("durable_cursors", ring.durable_cursors)?;
        Ok(dict)
    }

    fn close(&self) {
        self.engine.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine.is_closed()
    }

    fn __len__(&self) -> PyResult<usize> {
        self.engine.check_open()?;
        Ok(self.engine.len())
    }
}

// -- VersionRecord -------------------------------------------------------------------

/// One version as a store writes it: the row of the execution and its delta.
#[pyclass(frozen, module = "wfstate._core", name = "VersionRecord")]
#[derive(Clone)]
pub struct PyVersionRecord {
    pub(crate) state: Arc<State>,
    pub(crate) base_version: u64,
    pub(crate) actor: Option<Arc<str>>,
    pub(crate) delta: Vec<u8>,
    pub(crate) event_types: Vec<EventKind>,
    pub(crate) node_ids: Vec<Arc<str>>,
    pub(crate) last_seq: u64,
}

impl PyVersionRecord {
    pub(crate) fn new<'a>(
        state: Arc<State>,
        base_version: u64,
        actor: Option<Arc<str>>,
        events: impl Iterator<Item = (EventKind, Option<Arc<str>>, &'a [u8])>,
        last_seq: u64,
    ) -> Self {
        let events: Vec<crate::ring::PendingEvent> = events
            .map(|(kind, node_id, data)| crate::ring::PendingEvent {
                kind,
                node_id,
                data: data.into(),
            })
            .collect();
        let mut node_ids: Vec<Arc<str>> = Vec::new();
        for node_id in events.iter().filter_map(|e| e.node_id.as_ref()) {
            if !node_ids.contains(node_id) {
                node_ids.push(node_id.clone());
            }
        }
        PyVersionRecord {
            base_version,
            actor,
            delta: codec::encode_delta(&events),
            event_types: events.iter().map(|e| e.kind).collect(),
            node_ids,
            last_seq,
            state,
        }
    }
}

#[pymethods]
impl PyVersionRecord {
    #[getter]
    fn execution_id(&self) -> &str {
        &self.state.execution_id
    }

    #[getter]
    fn workflow_id(&self) -> &str {
        &self.state.workflow_id
    }

    #[getter]
    fn version(&self) -> u64 {
        self.state.version
    }

    /// The version this one was computed from; 0 for a creation.
    #[getter]
    fn base_version(&self) -> u64 {
        self.base_version
    }

    /// The execution status after this version, as its string value.
    #[getter]
    fn status(&self) -> &'static str {
        self.state.status.as_str()
    }

    #[getter]
    fn created_at_us(&self) -> i64 {
        self.state.created_at
    }

    #[getter]
    fn updated_at_us(&self) -> i64 {
        self.state.updated_at
    }

    #[getter]
    fn actor(&self) -> Option<&str> {
        self.actor.as_deref()
    }

    /// The version's events, encoded (MessagePack).
    #[getter]
    fn delta<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.delta)
    }

    #[getter]
    fn event_types(&self) -> Vec<&'static str> {
        self.event_types.iter().map(|k| k.as_str()).collect()
    }

    /// One bit per event type (the store's `event_mask` column; the bits of
    /// `wfstate.store.base.EVENT_TYPE_BITS`).
    #[getter]
    fn event_mask(&self) -> u32 {
        crate::batch::event_mask(&self.event_types)
    }

    /// The distinct nodes the version's events are about.
    #[getter]
    fn node_ids(&self) -> Vec<String> {
        self.node_ids.iter().map(|n| n.to_string()).collect()
    }

    /// The ring sequence number of the version's last event (0 before publish).
    #[getter]
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    #[getter]
    fn forked_from(&self) -> Option<(String, u64)> {
        fork_link(&self.state)
    }

    /// The state after this version.
    #[getter]
    fn state(&self) -> PyWorkflowState {
        PyWorkflowState {
            state: self.state.clone(),
        }
    }

    /// The SQLite store's parameters for this version of an existing execution,
    /// written without a lease (the sync path of one writer), as for a chain of one
    /// (`sqlite_write_rows`): the UPDATE of the execution's row, the delta rows and
    /// the snapshot rows.
    #[allow(clippy::type_complexity)]
    fn sqlite_update_rows<'py>(
        &self,
        py: Python<'py>,
        snapshot: Option<Bound<'py, PyBytes>>,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        Vec<Bound<'py, PyAny>>,
        Vec<Bound<'py, PyAny>>,
    )> {
        if self.base_version == 0 {
            return Err(PyValueError::new_err(
                "sqlite_update_rows: a creation is written with its INSERT row (sqlite_write_rows)",
            ));
        }
        let view = crate::batch::ChainView {
            id: &self.state.execution_id,
            records: vec![self],
            snapshots: vec![snapshot.as_ref().map(|b| b.as_bytes())],
            lease: None,
        };
        crate::batch::sqlite_chain(py, &view)
    }

    /// The PostgreSQL store's one-version write parameters, in libpq's formats (text,
    /// and bytea as binary; None is NULL), by name: `id`, `base`, `version`,
    /// `status`, `updated`, `actor`, `mask`, `nodes` (an array literal), `data`,
    /// `lease_owner`, `lease_token`, `snapshot`, and for a creation `workflow`,
    /// `created`, `forked_id`, `forked_version`.
    fn pg_parameters<'py>(
        &self,
        py: Python<'py>,
        snapshot: Option<Bound<'py, PyBytes>>,
        lease: Option<(String, i64)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let state = &self.state;
        let text = |value: &str| PyBytes::new(py, value.as_bytes());
        let number = |value: i128| PyBytes::new(py, value.to_string().as_bytes());
        let parameters = PyDict::new(py);
        parameters.set_item("id", text(&state.execution_id))?;
        parameters.set_item("base", number(self.base_version.into()))?;
        parameters.set_item("version", number(state.version.into()))?;
        parameters.set_item("status", text(state.status.as_str()))?;
        parameters.set_item("updated", number(state.updated_at.into()))?;
        parameters.set_item("actor", self.actor.as_deref().map(text))?;
        let mask = crate::batch::event_mask(&self.event_types);
        parameters.set_item("mask", number(mask.into()))?;
        let nodes = crate::batch::text_array_literal(&self.node_ids);
        parameters.set_item("nodes", text(&nodes))?;
        parameters.set_item("data", PyBytes::new(py, &self.delta))?;
        let (owner, token) = match &lease {
            Some((owner, token)) => (Some(text(owner)), Some(number((*token).into()))),
            None => (None, None),
        };
        parameters.set_item("lease_owner", owner)?;
        parameters.set_item("lease_token", token)?;
        parameters.set_item("snapshot", snapshot)?;
        if self.base_version == 0 {
            parameters.set_item("workflow", text(&state.workflow_id))?;
            parameters.set_item("created", number(state.created_at.into()))?;
            let (forked_id, forked_version) = match &state.forked_from {
                Some((id, version)) => (Some(text(id)), Some(number((*version).into()))),
                None => (None, None),
            };
            parameters.set_item("forked_id", forked_id)?;
            parameters.set_item("forked_version", forked_version)?;
        }
        Ok(parameters)
    }

    /// The state after this version as snapshot bytes (encoded on each call).
    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let state = self.state.clone();
        let bytes = py.detach(|| codec::encode_snapshot(&state));
        PyBytes::new(py, &bytes)
    }

    fn __repr__(&self) -> String {
        format!(
            "VersionRecord(execution_id={:?}, version={}, base_version={}, events={})",
            &*self.state.execution_id,
            self.state.version,
            self.base_version,
            self.event_types.len()
        )
    }
}

// -- module functions ----------------------------------------------------------------

fn enum_members(enum_type: &Bound<'_, PyType>, values: &[&str]) -> PyResult<Vec<Py<PyAny>>> {
    values
        .iter()
        .map(|value| Ok(enum_type.call1((*value,))?.unbind()))
        .collect()
}

/// Bind the Python enums and classes the core hands out. Called once by `wfstate`.
#[pyfunction]
pub fn bind_types(
    py: Python<'_>,
    execution_status: &Bound<'_, PyType>,
    node_status: &Bound<'_, PyType>,
    event_type: &Bound<'_, PyType>,
    state_update: &Bound<'_, PyType>,
    exception_to_error: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let exec_values: Vec<&str> = ExecStatus::ALL.iter().map(|s| s.as_str()).collect();
    let node_values: Vec<&str> = NodeStatus::ALL.iter().map(|s| s.as_str()).collect();
    let event_values: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    let bound = BoundTypes {
        exec_status: enum_members(execution_status, &exec_values)?,
        node_status: enum_members(node_status, &node_values)?,
        event_type: enum_members(event_type, &event_values)?,
        state_update: state_update.clone().unbind(),
        exception_to_error: exception_to_error.clone().unbind(),
        unset: py.import("wfstate._model")?.getattr("UNSET")?.unbind(),
    };
    // A second import (e.g. importlib.reload) keeps the first binding.
    let _ = TYPES.set(py, bound);
    Ok(())
}

/// A new execution id: a time-ordered UUIDv7, as `create` makes when given None
/// (for a caller that must know the id before it prepares the creation).
#[pyfunction]
pub fn new_execution_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Decode an event's MessagePack data (`StateEvent.encoded_data`) to Python values.
#[pyfunction]
pub fn decode_data<'py>(py: Python<'py>, encoded: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    json_to_py(py, &decode_value(encoded)?)
}

/// Rebuild a state from its latest snapshot at or below the wanted version (or None)
/// and the deltas after it, as `(version, recorded_at_us, delta)` in version order.
#[pyfunction]
#[pyo3(signature = (execution_id, snapshot, deltas))]
pub fn rebuild(
    py: Python<'_>,
    execution_id: &Bound<'_, PyAny>,
    snapshot: Option<&[u8]>,
    deltas: Vec<(u64, i64, Vec<u8>)>,
) -> PyResult<PyWorkflowState> {
    let execution_id: Arc<str> = Arc::from(id_str(execution_id, "execution_id")?);
    let snapshot = snapshot.map(<[u8]>::to_vec);
    let state = py.detach(|| -> Result<State, CoreError> {
        let state = snapshot
            .map(|s| codec::decode_snapshot(&s, 0))
            .transpose()?;
        codec::replay_deltas(state, &execution_id, &deltas, 0)?.ok_or_else(|| {
            CoreError::NotFound(format!("no stored version of execution {execution_id:?}"))
        })
    })?;
    Ok(PyWorkflowState {
        state: Arc::new(state),
    })
}

/// A state moved forward by the stored deltas that follow it, as
/// `(version, recorded_at_us, delta)` in version order (the versions another writer
/// stored since): what `rebuild` would give, without reading the snapshot again.
#[pyfunction]
#[pyo3(signature = (state, deltas))]
pub fn advance(
    py: Python<'_>,
    state: &PyWorkflowState,
    deltas: Vec<(u64, i64, Vec<u8>)>,
) -> PyResult<PyWorkflowState> {
    let start = state.state.clone();
    let state = py.detach(|| -> Result<State, CoreError> {
        let replayed = codec::replay_deltas(
            Some(State::clone(&start)),
            &start.execution_id,
            &deltas,
            start.created_seq,
        )?;
        Ok(replayed.expect("replay from a state gives a state"))
    })?;
    Ok(PyWorkflowState {
        state: Arc::new(state),
    })
}

/// Stored deltas, as `(version, recorded_at_us, actor, delta)`, back into events
/// (`seq` 0: the ring order is not stored), filtered like `Core.history`.
#[pyfunction]
#[pyo3(signature = (execution_id, deltas, since_us = None, until_us = None, types = None, node_id = None, after_version = None, limit = None))]
#[allow(clippy::too_many_arguments)]
pub fn decode_history(
    py: Python<'_>,
    execution_id: &Bound<'_, PyAny>,
    deltas: Vec<(u64, i64, Option<String>, Vec<u8>)>,
    since_us: Option<i64>,
    until_us: Option<i64>,
    types: Option<&Bound<'_, PyAny>>,
    node_id: Option<&Bound<'_, PyAny>>,
    after_version: Option<&Bound<'_, PyAny>>,
    limit: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<Py<PyStateEvent>>> {
    let execution_id: Arc<str> = Arc::from(id_str(execution_id, "execution_id")?);
    let filter = history_filter(since_us, until_us, types, node_id, after_version, limit)?;
    let events = py.detach(|| -> Result<Vec<Arc<Event>>, CoreError> {
        let mut events = Vec::new();
        let limit = filter.limit.unwrap_or(usize::MAX);
        for (version, timestamp, actor, delta) in deltas {
            let actor: Option<Arc<str>> = actor.map(Arc::from);
            for (kind, node_id, data) in codec::decode_delta(&delta)? {
                if events.len() >= limit {
                    return Ok(events);
                }
                let event = Event {
                    seq: 0,
                    execution_id: execution_id.clone(),
                    version,
                    timestamp,
                    kind,
                    node_id,
                    actor: actor.clone(),
                    data: crate::engine::encode_value(&data),
                };
                if filter.matches(&event) {
                    events.push(Arc::new(event));
                }
            }
        }
        Ok(events)
    })?;
    events_to_py(py, events)
}
