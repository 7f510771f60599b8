//! The execution state model and the pure apply function.
//!
//! Everything here is plain Rust with no Python: a state, an update, the transition
//! tables and `apply`, which checks an update against a state and computes the next
//! state and the events that describe the change. It never mutates its input, so a
//! failed check changes nothing, and it never looks at a clock (the caller passes
//! `now`), so it is deterministic and testable.

use std::sync::Arc;

use imbl::OrdMap;
use serde_json::{Map, Value};

use crate::errors::CoreError;

/// Variables and context: top-level key -> JSON value, shared between versions.
pub type JsonMap = OrdMap<Arc<str>, Arc<Value>>;

/// Top-level entries of an update's variables or context, in the caller's order.
pub type JsonEntries = Vec<(Arc<str>, Arc<Value>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecStatus {
    Running,
    Suspended,
    Completed,
    Failed,
    Cancelled,
}

impl ExecStatus {
    pub const ALL: [ExecStatus; 5] = [
        ExecStatus::Running,
        ExecStatus::Suspended,
        ExecStatus::Completed,
        ExecStatus::Failed,
        ExecStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Running => "running",
            ExecStatus::Suspended => "suspended",
            ExecStatus::Completed => "completed",
            ExecStatus::Failed => "failed",
            ExecStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The execution transition table of docs/semantics.md.
    pub fn can_become(self, next: ExecStatus) -> bool {
        use ExecStatus::*;
        matches!(
            (self, next),
            (Running, Suspended | Completed | Failed | Cancelled)
                | (Suspended, Running | Failed | Cancelled)
                | (Failed, Running)
        )
    }

    /// Completed, failed and cancelled executions accept no update (but failed -> running).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ExecStatus::Completed | ExecStatus::Failed | ExecStatus::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Skipped,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 5] = [
        NodeStatus::Pending,
        NodeStatus::Running,
        NodeStatus::Completed,
        NodeStatus::Failed,
        NodeStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Pending => "pending",
            NodeStatus::Running => "running",
            NodeStatus::Completed => "completed",
            NodeStatus::Failed => "failed",
            NodeStatus::Skipped => "skipped",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The node transition table; `None` is a node absent from the state.
    pub fn allowed(from: Option<NodeStatus>, to: NodeStatus) -> bool {
        use NodeStatus::*;
        match from {
            None => matches!(to, Pending | Running | Skipped),
            Some(from) => matches!(
                (from, to),
                (Pending, Running | Skipped)
                    | (Running, Completed | Failed)
                    | (Failed, Running | Skipped)
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    ExecutionCreated,
    ExecutionForked,
    StatusChange,
    NodePending,
    NodeStart,
    NodeComplete,
    NodeFailed,
    NodeSkipped,
    NodeMetrics,
    Error,
    CurrentNodeChanged,
    VariablesChanged,
    ContextChanged,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::ExecutionCreated,
        EventKind::ExecutionForked,
        EventKind::StatusChange,
        EventKind::NodePending,
        EventKind::NodeStart,
        EventKind::NodeComplete,
        EventKind::NodeFailed,
        EventKind::NodeSkipped,
        EventKind::NodeMetrics,
        EventKind::Error,
        EventKind::CurrentNodeChanged,
        EventKind::VariablesChanged,
        EventKind::ContextChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ExecutionCreated => "execution_created",
            EventKind::ExecutionForked => "execution_forked",
            EventKind::StatusChange => "status_change",
            EventKind::NodePending => "node_pending",
            EventKind::NodeStart => "node_start",
            EventKind::NodeComplete => "node_complete",
            EventKind::NodeFailed => "node_failed",
            EventKind::NodeSkipped => "node_skipped",
            EventKind::NodeMetrics => "node_metrics",
            EventKind::Error => "error",
            EventKind::CurrentNodeChanged => "current_node_changed",
            EventKind::VariablesChanged => "variables_changed",
            EventKind::ContextChanged => "context_changed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == value)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn for_node_status(status: NodeStatus) -> Self {
        match status {
            NodeStatus::Pending => EventKind::NodePending,
            NodeStatus::Running => EventKind::NodeStart,
            NodeStatus::Completed => EventKind::NodeComplete,
            NodeStatus::Failed => EventKind::NodeFailed,
            NodeStatus::Skipped => EventKind::NodeSkipped,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeState {
    pub status: NodeStatus,
    pub attempts: u32,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// `{"type", "message", "details"}` of the failure, while the node is failed.
    pub error: Option<Arc<Value>>,
}

/// One version of one execution. Cheap to clone: the maps share structure.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub execution_id: Arc<str>,
    pub workflow_id: Arc<str>,
    pub status: ExecStatus,
    pub current_node: Option<Arc<str>>,
    pub nodes: OrdMap<Arc<str>, Arc<NodeState>>,
    pub variables: JsonMap,
    pub context: JsonMap,
    pub version: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub created_at: i64,
    pub updated_at: i64,
    /// Error events ever recorded for this execution (survives ring eviction).
    pub error_count: u64,
    /// Global order of creation, for listing executions in creation order.
    pub created_seq: u64,
    /// The execution and version this one was forked from.
    pub forked_from: Option<(Arc<str>, u64)>,
}

/// A parsed, validated update. `None` means the field was not given.
#[derive(Clone, Debug, Default)]
pub struct Update {
    pub status: Option<ExecStatus>,
    pub current_node: Option<Option<Arc<str>>>,
    pub variables: Option<JsonEntries>,
    pub unset_variables: Option<Vec<Arc<str>>>,
    pub context: Option<JsonEntries>,
    pub nodes: Option<Vec<(Arc<str>, NodeStatus)>>,
    /// `{"type", "message", "details"}`.
    pub error: Option<Arc<Value>>,
    /// node id -> `{"duration"?, "cpu_time"?, "peak_memory"?}`.
    pub metrics: Option<Vec<(Arc<str>, Value)>>,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.current_node.is_none()
            && self.variables.is_none()
            && self.unset_variables.is_none()
            && self.context.is_none()
            && self.nodes.is_none()
            && self.error.is_none()
            && self.metrics.is_none()
    }

    /// Checks that need no state: not empty, no name both set and unset.
    pub fn check_shape(&self) -> Result<(), CoreError> {
        if self.is_empty() {
            return Err(CoreError::Validation(
                "empty update: set at least one field".into(),
            ));
        }
        if let (Some(set), Some(unset)) = (&self.variables, &self.unset_variables) {
            for name in unset {
                if set.iter().any(|(key, _)| key == name) {
                    return Err(CoreError::Validation(format!(
                        "variable {name:?} is both set and unset in one update"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An event before it gets its sequence number: its data is MessagePack already.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    pub kind: EventKind,
    pub node_id: Option<Arc<str>>,
    pub data: Vec<u8>,
}

impl EventDraft {
    fn from_value(kind: EventKind, node_id: Option<Arc<str>>, data: &Value) -> Self {
        EventDraft {
            kind,
            node_id,
            data: rmp_serde::to_vec(data).expect("a Value always encodes"),
        }
    }

    /// The data decoded (tests and diagnostics; the hot path never decodes).
    pub fn value(&self) -> Value {
        rmp_serde::from_slice(&self.data).expect("drafts hold valid MessagePack")
    }
}

/// Writes an event's data map straight to MessagePack, without building a `Value`
/// (or cloning the caller's values) on the write path.
struct DataMap(Vec<u8>);

impl DataMap {
    fn new(entries: u32) -> Self {
        let mut buf = Vec::with_capacity(48);
        rmp::encode::write_map_len(&mut buf, entries).expect("writing to a Vec");
        DataMap(buf)
    }

    fn key(&mut self, key: &str) -> &mut Self {
        rmp::encode::write_str(&mut self.0, key).expect("writing to a Vec");
        self
    }

    fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        rmp::encode::write_str(&mut self.0, value).expect("writing to a Vec");
        self
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => {
                self.key(key);
                rmp::encode::write_nil(&mut self.0).expect("writing to a Vec");
                self
            }
        }
    }

    fn uint(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        rmp::encode::write_uint(&mut self.0, value).expect("writing to a Vec");
        self
    }

    fn value(&mut self, key: &str, value: &Value) -> &mut Self {
        self.key(key);
        rmp_serde::encode::write(&mut self.0, value).expect("a Value always encodes");
        self
    }

    fn entries(&mut self, key: &str, entries: &[(Arc<str>, Arc<Value>)]) -> &mut Self {
        self.key(key);
        rmp::encode::write_map_len(&mut self.0, entries.len() as u32).expect("writing to a Vec");
        for (name, value) in entries {
            rmp::encode::write_str(&mut self.0, name).expect("writing to a Vec");
            rmp_serde::encode::write(&mut self.0, &**value).expect("a Value always encodes");
        }
        self
    }

    fn names(&mut self, key: &str, names: &[&Arc<str>]) -> &mut Self {
        self.key(key);
        rmp::encode::write_array_len(&mut self.0, names.len() as u32).expect("writing to a Vec");
        for name in names {
            rmp::encode::write_str(&mut self.0, name).expect("writing to a Vec");
        }
        self
    }

    fn draft(self, kind: EventKind, node_id: Option<Arc<str>>) -> EventDraft {
        EventDraft {
            kind,
            node_id,
            data: self.0,
        }
    }
}

fn opt_str(value: &Option<Arc<str>>) -> Value {
    match value {
        Some(text) => Value::String(text.to_string()),
        None => Value::Null,
    }
}

fn json_object(entries: &[(Arc<str>, Arc<Value>)]) -> Value {
    let mut map = Map::with_capacity(entries.len());
    for (key, value) in entries {
        map.insert(key.to_string(), Value::clone(value));
    }
    Value::Object(map)
}

pub fn json_map_to_value(map: &JsonMap) -> Value {
    let mut object = Map::with_capacity(map.len());
    for (key, value) in map.iter() {
        object.insert(key.to_string(), Value::clone(value));
    }
    Value::Object(object)
}

fn seconds_between(start: i64, end: i64) -> f64 {
    (end - start) as f64 / 1e6
}

/// A new execution at version 1 and its `execution_created` event.
pub fn create(
    execution_id: Arc<str>,
    workflow_id: Arc<str>,
    variables: Vec<(Arc<str>, Arc<Value>)>,
    context: Vec<(Arc<str>, Arc<Value>)>,
    now: i64,
    created_seq: u64,
) -> (State, EventDraft) {
    let mut data = Map::with_capacity(3);
    data.insert("workflow_id".into(), Value::String(workflow_id.to_string()));
    data.insert("variables".into(), json_object(&variables));
    data.insert("context".into(), json_object(&context));
    let state = State {
        execution_id,
        workflow_id,
        status: ExecStatus::Running,
        current_node: None,
        nodes: OrdMap::new(),
        variables: variables.into_iter().collect(),
        context: context.into_iter().collect(),
        version: 1,
        created_at: now,
        updated_at: now,
        error_count: 0,
        created_seq,
        forked_from: None,
    };
    let event = EventDraft::from_value(EventKind::ExecutionCreated, None, &Value::Object(data));
    (state, event)
}

/// A new execution that starts, running, from `source` (any version of another one).
///
/// Its `execution_created` event carries the whole starting state and the link back,
/// so that replaying it alone rebuilds version 1.
pub fn fork(
    source: &State,
    execution_id: Arc<str>,
    now: i64,
    created_seq: u64,
) -> (State, EventDraft) {
    let mut data = Map::with_capacity(6);
    data.insert(
        "workflow_id".into(),
        Value::String(source.workflow_id.to_string()),
    );
    data.insert("variables".into(), json_map_to_value(&source.variables));
    data.insert("context".into(), json_map_to_value(&source.context));
    data.insert("nodes".into(), crate::codec::nodes_to_value(&source.nodes));
    data.insert("current_node".into(), opt_str(&source.current_node));
    let mut link = Map::with_capacity(2);
    link.insert(
        "execution_id".into(),
        Value::String(source.execution_id.to_string()),
    );
    link.insert("version".into(), source.version.into());
    data.insert("forked_from".into(), Value::Object(link));
    let state = State {
        execution_id,
        workflow_id: source.workflow_id.clone(),
        status: ExecStatus::Running,
        current_node: source.current_node.clone(),
        nodes: source.nodes.clone(),
        variables: source.variables.clone(),
        context: source.context.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
        error_count: 0,
        created_seq,
        forked_from: Some((source.execution_id.clone(), source.version)),
    };
    let event = EventDraft::from_value(EventKind::ExecutionCreated, None, &Value::Object(data));
    (state, event)
}

/// The source's side of a fork: a version that records the link and changes nothing
/// else. Allowed in every status, final ones included.
pub fn record_fork(
    current: &State,
    forked_version: u64,
    new_execution_id: &str,
    now: i64,
) -> (State, EventDraft) {
    let mut next = current.clone();
    next.version = current.version + 1;
    next.updated_at = now.max(current.updated_at);
    let mut data = Map::with_capacity(2);
    data.insert(
        "execution_id".into(),
        Value::String(new_execution_id.to_string()),
    );
    data.insert("from_version".into(), forked_version.into());
    let event = EventDraft::from_value(EventKind::ExecutionForked, None, &Value::Object(data));
    (next, event)
}

/// Check `update` against `current` and compute the next version and its events.
///
/// `now` is the caller's clock in microseconds; it is clamped so time never goes
/// backwards within an execution. The version check (`expected_version`) is the
/// caller's: this function checks transitions only.
pub fn apply(
    current: &State,
    update: &Update,
    now: i64,
) -> Result<(State, Vec<EventDraft>), CoreError> {
    let now = now.max(current.updated_at);
    let id = &current.execution_id;

    if current.status.is_final()
        && !(current.status == ExecStatus::Failed && update.status == Some(ExecStatus::Running))
    {
        return Err(CoreError::InvalidTransition(format!(
            "execution {id:?} is {}: it accepts no update{}",
            current.status.as_str(),
            if current.status == ExecStatus::Failed {
                " except one that sets it running again"
            } else {
                ""
            }
        )));
    }

    let mut next = current.clone();
    next.version = current.version + 1;
    next.updated_at = now;
    let mut events = Vec::with_capacity(4);

    if let Some(status) = update.status {
        if !current.status.can_become(status) {
            return Err(CoreError::InvalidTransition(format!(
                "execution {id:?} cannot go from {} to {}",
                current.status.as_str(),
                status.as_str()
            )));
        }
        next.status = status;
        let mut data = DataMap::new(2);
        data.str("from", current.status.as_str())
            .str("to", status.as_str());
        events.push(data.draft(EventKind::StatusChange, None));
    }

    let metrics_for = |node_id: &str| -> Option<&Value> {
        update
            .metrics
            .as_ref()
            .and_then(|m| m.iter().find(|(id, _)| &**id == node_id).map(|(_, v)| v))
    };

    let mut failed_nodes: Vec<Arc<str>> = Vec::new();
    if let Some(nodes) = &update.nodes {
        for (node_id, to) in nodes {
            let previous = next.nodes.get(node_id).cloned();
            let from = previous.as_ref().map(|n| n.status);
            if !NodeStatus::allowed(from, *to) {
                return Err(CoreError::InvalidTransition(format!(
                    "node {node_id:?} of execution {id:?} cannot go from {} to {}",
                    from.map_or("(absent)", NodeStatus::as_str),
                    to.as_str()
                )));
            }
            let mut node = previous.as_deref().cloned().unwrap_or(NodeState {
                status: NodeStatus::Pending,
                attempts: 0,
                started_at: None,
                finished_at: None,
                error: None,
            });
            let from_text = match from {
                Some(status) => Some(status.as_str()),
                None if *to == NodeStatus::Pending => None,
                None => Some(NodeStatus::Pending.as_str()),
            };
            let metrics = metrics_for(node_id);
            node.status = *to;
            let mut duration = None;
            match to {
                NodeStatus::Pending => {}
                NodeStatus::Running => {
                    node.attempts += 1;
                    node.started_at = Some(now);
                    node.finished_at = None;
                    node.error = None;
                }
                NodeStatus::Completed | NodeStatus::Failed => {
                    node.finished_at = Some(now);
                    let reported = metrics.and_then(|m| m.get("duration")).cloned();
                    duration = Some(reported.unwrap_or_else(|| {
                        let started = node.started_at.unwrap_or(now);
                        Value::from(seconds_between(started, now))
                    }));
                    if *to == NodeStatus::Failed {
                        node.error = update.error.clone();
                        failed_nodes.push(node_id.clone());
                    }
                }
                NodeStatus::Skipped => {
                    node.finished_at = Some(now);
                }
            }
            let with_attempt = matches!(
                to,
                NodeStatus::Running | NodeStatus::Completed | NodeStatus::Failed
            );
            let entries = 2
                + u32::from(with_attempt)
                + u32::from(duration.is_some())
                + u32::from(metrics.is_some());
            let mut data = DataMap::new(entries);
            data.opt_str("from", from_text).str("to", to.as_str());
            if with_attempt {
                data.uint("attempt", u64::from(node.attempts));
            }
            if let Some(duration) = &duration {
                data.value("duration", duration);
            }
            if let Some(metrics) = metrics {
                data.value("metrics", metrics);
            }
            next.nodes.insert(node_id.clone(), Arc::new(node));
            events.push(data.draft(EventKind::for_node_status(*to), Some(node_id.clone())));
        }
    }

    if let Some(error) = &update.error {
        next.error_count += 1;
        let node_id = if failed_nodes.len() == 1 {
            failed_nodes.pop()
        } else {
            None
        };
        events.push(EventDraft::from_value(EventKind::Error, node_id, error));
    }

    if let Some(metrics) = &update.metrics {
        let moved = |node_id: &str| {
            update
                .nodes
                .as_ref()
                .is_some_and(|nodes| nodes.iter().any(|(id, _)| &**id == node_id))
        };
        for (node_id, figures) in metrics {
            if moved(node_id) {
                continue;
            }
            let mut data = DataMap::new(1);
            data.value("metrics", figures);
            events.push(data.draft(EventKind::NodeMetrics, Some(node_id.clone())));
        }
    }

    if let Some(current_node) = &update.current_node {
        let mut data = DataMap::new(2);
        data.opt_str("from", current.current_node.as_deref())
            .opt_str("to", current_node.as_deref());
        next.current_node = current_node.clone();
        events.push(data.draft(EventKind::CurrentNodeChanged, None));
    }

    if update.variables.is_some() || update.unset_variables.is_some() {
        let set = update.variables.as_deref().unwrap_or(&[]);
        for (key, value) in set {
            next.variables.insert(key.clone(), value.clone());
        }
        let mut removed = Vec::new();
        for name in update.unset_variables.as_deref().unwrap_or(&[]) {
            if next.variables.remove(name).is_some() {
                removed.push(name);
            }
        }
        let mut data = DataMap::new(2);
        data.entries("set", set).names("unset", &removed);
        events.push(data.draft(EventKind::VariablesChanged, None));
    }

    if let Some(context) = &update.context {
        for (key, value) in context {
            next.context.insert(key.clone(), value.clone());
        }
        let mut data = DataMap::new(1);
        data.entries("set", context);
        events.push(data.draft(EventKind::ContextChanged, None));
    }

    Ok((next, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> State {
        create("e1".into(), "wf".into(), vec![], vec![], 1_000, 1).0
    }

    fn nodes(items: &[(&str, NodeStatus)]) -> Update {
        Update {
            nodes: Some(items.iter().map(|(id, s)| (Arc::from(*id), *s)).collect()),
            ..Update::default()
        }
    }

    #[test]
    fn node_retry_counts_attempts_and_events_are_ordered() {
        let s1 = base();
        let (s2, ev) = apply(&s1, &nodes(&[("a", NodeStatus::Running)]), 2_000).unwrap();
        assert_eq!(s2.version, 2);
        assert_eq!(s2.nodes.get("a").unwrap().attempts, 1);
        assert_eq!(ev[0].kind, EventKind::NodeStart);
        let failing = Update {
            error: Some(Arc::new(
                serde_json::json!({"type": "E", "message": "m", "details": null}),
            )),
            ..nodes(&[("a", NodeStatus::Failed)])
        };
        let (s3, ev) = apply(&s2, &failing, 3_500).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].value()["duration"], serde_json::json!(0.0015));
        assert_eq!(ev[1].kind, EventKind::Error);
        assert_eq!(ev[1].node_id.as_deref(), Some("a"));
        assert!(s3.nodes.get("a").unwrap().error.is_some());
        assert_eq!(s3.error_count, 1);
        let (s4, _) = apply(&s3, &nodes(&[("a", NodeStatus::Running)]), 4_000).unwrap();
        let node = s4.nodes.get("a").unwrap();
        assert_eq!((node.attempts, node.error.is_none()), (2, true));
    }

    #[test]
    fn illegal_transitions_are_refused_and_input_is_untouched() {
        let s1 = base();
        let before = s1.clone();
        let err = apply(&s1, &nodes(&[("a", NodeStatus::Completed)]), 2_000).unwrap_err();
        assert!(matches!(err, CoreError::InvalidTransition(_)));
        assert_eq!(s1, before);
        let done = Update {
            status: Some(ExecStatus::Completed),
            ..Update::default()
        };
        let (s2, _) = apply(&s1, &done, 2_000).unwrap();
        let err = apply(&s2, &nodes(&[("a", NodeStatus::Running)]), 3_000).unwrap_err();
        assert!(matches!(err, CoreError::InvalidTransition(_)));
    }

    #[test]
    fn transition_tables_match_the_documentation() {
        use ExecStatus::*;
        let allowed: Vec<(ExecStatus, ExecStatus)> = ExecStatus::ALL
            .iter()
            .flat_map(|a| ExecStatus::ALL.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Running, Suspended),
                (Running, Completed),
                (Running, Failed),
                (Running, Cancelled),
                (Suspended, Running),
                (Suspended, Failed),
                (Suspended, Cancelled),
                (Failed, Running),
            ]
        );
        assert!(NodeStatus::allowed(None, NodeStatus::Pending));
        assert!(!NodeStatus::allowed(
            Some(NodeStatus::Pending),
            NodeStatus::Pending
        ));
        assert!(!NodeStatus::allowed(
            Some(NodeStatus::Completed),
            NodeStatus::Running
        ));
    }

    #[test]
    fn time_never_goes_backwards() {
        let s1 = base();
        let (s2, _) = apply(&s1, &nodes(&[("a", NodeStatus::Running)]), 10).unwrap();
        assert_eq!(s2.updated_at, s1.updated_at);
    }
}
