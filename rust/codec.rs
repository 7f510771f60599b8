//! The bytes a store keeps: one delta per version, and snapshots.
//!
//! A *delta* is the MessagePack array of the version's events, each
//! `[type, node_id | nil, data]`, where `data` is the event's already-encoded
//! MessagePack, copied in as it is: no event is re-encoded on its way to the store.
//! A *snapshot* is a whole state in MessagePack. `replay` rebuilds a state from a
//! snapshot and the deltas after it, exactly as the write path produced it; it is
//! the reason every event carries the full change (the node's attempt, the values
//! set), not just a description of it.

use std::io::Write;
use std::sync::Arc;

use imbl::OrdMap;
use serde_json::{Map, Value};

use crate::errors::CoreError;
use crate::model::{EventKind, ExecStatus, JsonMap, NodeState, NodeStatus, State};
use crate::ring::PendingEvent;

const SNAPSHOT_FORMAT: u64 = 1;

fn corrupt(what: &str) -> CoreError {
    CoreError::Validation(format!("corrupt stored data: {what}"))
}

/// One version's events as a delta (see the module docs).
pub fn encode_delta(events: &[PendingEvent]) -> Vec<u8> {
    let size: usize = events.iter().map(|e| e.data.len() + 32).sum();
    let mut out = Vec::with_capacity(size + 5);
    rmp::encode::write_array_len(&mut out, events.len() as u32).expect("writing to a Vec");
    for event in events {
        rmp::encode::write_array_len(&mut out, 3).expect("writing to a Vec");
        rmp::encode::write_str(&mut out, event.kind.as_str()).expect("writing to a Vec");
        match &event.node_id {
            Some(node_id) => rmp::encode::write_str(&mut out, node_id).expect("writing to a Vec"),
            None => rmp::encode::write_nil(&mut out).expect("writing to a Vec"),
        }
        out.write_all(&event.data).expect("writing to a Vec");
    }
    out
}

/// A delta back into its events, each with its data re-encoded for the ring.
/// An event as stored in a delta: its type, node and data.
pub type DecodedEvent = (EventKind, Option<Arc<str>>, Value);

pub fn decode_delta(delta: &[u8]) -> Result<Vec<DecodedEvent>, CoreError> {
    let value: Value =
        rmp_serde::from_slice(delta).map_err(|_| corrupt("a delta is not MessagePack"))?;
    let Value::Array(items) = value else {
        return Err(corrupt("a delta is not an array"));
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut parts) = item else {
                return Err(corrupt("an event of a delta is not an array"));
            };
            if parts.len() != 3 {
                return Err(corrupt("an event of a delta has not 3 parts"));
            }
            let data = parts.pop().expect("3 parts");
            let node_id = match parts.pop().expect("3 parts") {
                Value::String(node_id) => Some(Arc::from(node_id)),
                Value::Null => None,
                _ => return Err(corrupt("an event's node id")),
            };
            let kind = parts
                .pop()
                .and_then(|k| k.as_str().and_then(EventKind::parse))
                .ok_or_else(|| corrupt("an event's type"))?;
            Ok((kind, node_id, data))
        })
        .collect()
}

fn opt_i64(value: Option<i64>) -> Value {
    value.map_or(Value::Null, Value::from)
}

pub fn node_to_value(node: &NodeState) -> Value {
    let mut map = Map::with_capacity(5);
    map.insert("status".into(), node.status.as_str().into());
    map.insert("attempts".into(), node.attempts.into());
    map.insert("started_at".into(), opt_i64(node.started_at));
    map.insert("finished_at".into(), opt_i64(node.finished_at));
    map.insert(
        "error".into(),
        node.error.as_deref().cloned().unwrap_or(Value::Null),
    );
    Value::Object(map)
}

fn node_from_value(value: &Value) -> Result<NodeState, CoreError> {
    let status = value
        .get("status")
        .and_then(Value::as_str)
        .and_then(NodeStatus::parse)
        .ok_or_else(|| corrupt("a node's status"))?;
    let attempts = value
        .get("attempts")
        .and_then(Value::as_u64)
        .ok_or_else(|| corrupt("a node's attempts"))? as u32;
    let error = match value.get("error") {
        None | Some(Value::Null) => None,
        Some(error) => Some(Arc::new(error.clone())),
    };
    Ok(NodeState {
        status,
        attempts,
        started_at: value.get("started_at").and_then(Value::as_i64),
        finished_at: value.get("finished_at").and_then(Value::as_i64),
        error,
    })
}

pub fn nodes_to_value(nodes: &OrdMap<Arc<str>, Arc<NodeState>>) -> Value {
    Value::Object(
        nodes
            .iter()
            .map(|(id, node)| (id.to_string(), node_to_value(node)))
            .collect(),
    )
}

fn nodes_from_value(value: Option<&Value>) -> Result<OrdMap<Arc<str>, Arc<NodeState>>, CoreError> {
    let mut nodes = OrdMap::new();
    if let Some(Value::Object(map)) = value {
        for (id, node) in map {
            nodes.insert(Arc::from(id.as_str()), Arc::new(node_from_value(node)?));
        }
    }
    Ok(nodes)
}

fn json_map_from_value(value: Option<&Value>) -> JsonMap {
    match value {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(key, value)| (Arc::from(key.as_str()), Arc::new(value.clone())))
            .collect(),
        _ => JsonMap::new(),
    }
}

/// A whole state as snapshot bytes.
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    let mut map = Map::with_capacity(13);
    map.insert("format".into(), SNAPSHOT_FORMAT.into());
    map.insert("execution_id".into(), state.execution_id.to_string().into());
    map.insert("workflow_id".into(), state.workflow_id.to_string().into());
    map.insert("status".into(), state.status.as_str().into());
    map.insert(
        "current_node".into(),
        state
            .current_node
            .as_deref()
            .map_or(Value::Null, Value::from),
    );
    map.insert("nodes".into(), nodes_to_value(&state.nodes));
    map.insert(
        "variables".into(),
        crate::model::json_map_to_value(&state.variables),
    );
    map.insert(
        "context".into(),
        crate::model::json_map_to_value(&state.context),
    );
    map.insert("version".into(), state.version.into());
    map.insert("created_at".into(), state.created_at.into());
    map.insert("updated_at".into(), state.updated_at.into());
    map.insert("error_count".into(), state.error_count.into());
    map.insert("forked_from".into(), fork_link_to_value(&state.forked_from));
    rmp_serde::to_vec(&Value::Object(map)).expect("a Value always encodes")
}

pub fn decode_snapshot(bytes: &[u8], created_seq: u64) -> Result<State, CoreError> {
    let value: Value =
        rmp_serde::from_slice(bytes).map_err(|_| corrupt("a snapshot is not MessagePack"))?;
    if value.get("format").and_then(Value::as_u64) != Some(SNAPSHOT_FORMAT) {
        return Err(corrupt("unknown snapshot format"));
    }
    let text = |key: &str| -> Result<Arc<str>, CoreError> {
        value
            .get(key)
            .and_then(Value::as_str)
            .map(Arc::from)
            .ok_or_else(|| corrupt(key))
    };
    let int = |key: &str| -> Result<i64, CoreError> {
        value
            .get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| corrupt(key))
    };
    Ok(State {
        execution_id: text("execution_id")?,
        workflow_id: text("workflow_id")?,
        status: ExecStatus::parse(&text("status")?).ok_or_else(|| corrupt("status"))?,
        current_node: value
            .get("current_node")
            .and_then(Value::as_str)
            .map(Arc::from),
        nodes: nodes_from_value(value.get("nodes"))?,
        variables: json_map_from_value(value.get("variables")),
        context: json_map_from_value(value.get("context")),
        version: int("version")? as u64,
        created_at: int("created_at")?,
        updated_at: int("updated_at")?,
        error_count: int("error_count")? as u64,
        created_seq,
        forked_from: fork_link_from_value(value.get("forked_from")),
    })
}

fn fork_link_to_value(link: &Option<(Arc<str>, u64)>) -> Value {
    match link {
        Some((execution_id, version)) => {
            serde_json::json!({"execution_id": &**execution_id, "version": version})
        }
        None => Value::Null,
    }
}

fn fork_link_from_value(value: Option<&Value>) -> Option<(Arc<str>, u64)> {
    let value = value?;
    Some((
        text_of(value, "execution_id")?,
        value.get("version")?.as_u64()?,
    ))
}

fn text_of(data: &Value, key: &str) -> Option<Arc<str>> {
    data.get(key).and_then(Value::as_str).map(Arc::from)
}

/// Replay stored deltas, `(version, recorded_at_us, delta)` in version order, onto
/// `state` (`None`: from nothing, the first delta creating the execution).
pub fn replay_deltas(
    mut state: Option<State>,
    execution_id: &Arc<str>,
    deltas: &[(u64, i64, Vec<u8>)],
    created_seq: u64,
) -> Result<Option<State>, CoreError> {
    for (version, timestamp, delta) in deltas {
        let events = decode_delta(delta)?;
        state = Some(replay_version(
            state,
            execution_id,
            *version,
            *timestamp,
            &events,
            created_seq,
        )?);
    }
    Ok(state)
}

/// Apply one stored version's events to the state before it (`None` for version 1).
pub fn replay_version(
    previous: Option<State>,
    execution_id: &Arc<str>,
    version: u64,
    timestamp: i64,
    events: &[DecodedEvent],
    created_seq: u64,
) -> Result<State, CoreError> {
    let mut state = match previous {
        Some(state) => state,
        None => {
            let Some((EventKind::ExecutionCreated, _, data)) = events.first() else {
                return Err(corrupt("the first version does not create the execution"));
            };
            State {
                execution_id: execution_id.clone(),
                workflow_id: text_of(data, "workflow_id").ok_or_else(|| corrupt("workflow_id"))?,
                status: ExecStatus::Running,
                current_node: text_of(data, "current_node"),
                nodes: nodes_from_value(data.get("nodes"))?,
                variables: json_map_from_value(data.get("variables")),
                context: json_map_from_value(data.get("context")),
                version,
                created_at: timestamp,
                updated_at: timestamp,
                error_count: 0,
                created_seq,
                forked_from: fork_link_from_value(data.get("forked_from")),
            }
        }
    };
    if state.version + 1 != version && !(version == 1 && state.version == 1) {
        return Err(corrupt(&format!(
            "version {version} of {execution_id:?} follows version {}",
            state.version
        )));
    }
    state.version = version;
    state.updated_at = timestamp;
    let mut failed_now: Vec<Arc<str>> = Vec::new();
    let mut error: Option<Arc<Value>> = None;
    for (kind, node_id, data) in events {
        let node_change =
            |state: &mut State, f: &dyn Fn(&mut NodeState)| -> Result<(), CoreError> {
                let node_id = node_id
                    .clone()
                    .ok_or_else(|| corrupt("a node event without a node"))?;
                let mut node = state
                    .nodes
                    .get(&node_id)
                    .map(|n| NodeState::clone(n))
                    .unwrap_or(NodeState {
                        status: NodeStatus::Pending,
                        attempts: 0,
                        started_at: None,
                        finished_at: None,
                        error: None,
                    });
                f(&mut node);
                state.nodes.insert(node_id, Arc::new(node));
                Ok(())
            };
        match kind {
            EventKind::ExecutionCreated | EventKind::NodeMetrics | EventKind::ExecutionForked => {}
            EventKind::StatusChange => {
                state.status = data
                    .get("to")
                    .and_then(Value::as_str)
                    .and_then(ExecStatus::parse)
                    .ok_or_else(|| corrupt("a status change"))?;
            }
            EventKind::NodePending => {
                node_change(&mut state, &|node| node.status = NodeStatus::Pending)?
            }
            EventKind::NodeStart => {
                let attempt = data.get("attempt").and_then(Value::as_u64).unwrap_or(1) as u32;
                node_change(&mut state, &|node| {
                    node.status = NodeStatus::Running;
                    node.attempts = attempt;
                    node.started_at = Some(timestamp);
                    node.finished_at = None;
                    node.error = None;
                })?;
            }
            EventKind::NodeComplete | EventKind::NodeSkipped | EventKind::NodeFailed => {
                let status = match kind {
                    EventKind::NodeComplete => NodeStatus::Completed,
                    EventKind::NodeSkipped => NodeStatus::Skipped,
                    _ => NodeStatus::Failed,
                };
                node_change(&mut state, &|node| {
                    node.status = status;
                    node.finished_at = Some(timestamp);
                    if status == NodeStatus::Failed {
                        node.error = None;
                    }
                })?;
                if status == NodeStatus::Failed {
                    failed_now.push(node_id.clone().expect("checked by node_change"));
                }
            }
            EventKind::Error => {
                state.error_count += 1;
                error = Some(Arc::new(data.clone()));
            }
            EventKind::CurrentNodeChanged => state.current_node = text_of(data, "to"),
            EventKind::VariablesChanged => {
                if let Some(Value::Object(set)) = data.get("set") {
                    for (key, value) in set {
                        state
                            .variables
                            .insert(Arc::from(key.as_str()), Arc::new(value.clone()));
                    }
                }
                if let Some(Value::Array(unset)) = data.get("unset") {
                    for name in unset.iter().filter_map(Value::as_str) {
                        state.variables.remove(name);
                    }
                }
            }
            EventKind::ContextChanged => {
                if let Some(Value::Object(set)) = data.get("set") {
                    for (key, value) in set {
                        state
                            .context
                            .insert(Arc::from(key.as_str()), Arc::new(value.clone()));
                    }
                }
            }
        }
    }
    // The update's error is attached to every node it failed.
    if let Some(error) = error {
        for node_id in failed_now {
            if let Some(node) = state.nodes.get(&node_id) {
                let mut node = NodeState::clone(node);
                node.error = Some(error.clone());
                state.nodes.insert(node_id, Arc::new(node));
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::encode;
    use crate::model::{self, Update};

    #[test]
    fn replaying_deltas_gives_the_state_the_write_path_computed() {
        let (mut state, created) = model::create(
            "e".into(),
            "wf".into(),
            vec![("a".into(), Arc::new(Value::from(1)))],
            vec![],
            1_000,
            7,
        );
        let mut replayed = replay_version(
            None,
            &state.execution_id,
            1,
            1_000,
            &decode_delta(&encode_delta(&encode(vec![created]))).unwrap(),
            7,
        )
        .unwrap();
        assert_eq!(replayed, state);
        let error = Arc::new(serde_json::json!({"type": "E", "message": "m", "details": null}));
        let updates = [
            Update {
                nodes: Some(vec![
                    ("n".into(), NodeStatus::Running),
                    ("m".into(), NodeStatus::Pending),
                ]),
                current_node: Some(Some("n".into())),
                ..Update::default()
            },
            Update {
                nodes: Some(vec![("n".into(), NodeStatus::Failed)]),
                error: Some(error),
                variables: Some(vec![(
                    "b".into(),
                    Arc::new(serde_json::json!({"x": [1, 2.5]})),
                )]),
                unset_variables: Some(vec!["a".into()]),
                ..Update::default()
            },
            Update {
                nodes: Some(vec![
                    ("n".into(), NodeStatus::Running),
                    ("m".into(), NodeStatus::Skipped),
                ]),
                context: Some(vec![("k".into(), Arc::new(Value::from("v")))]),
                status: Some(ExecStatus::Suspended),
                ..Update::default()
            },
        ];
        for (step, update) in updates.iter().enumerate() {
            let (next, drafts) = model::apply(&state, update, 2_000 + step as i64 * 10).unwrap();
            let delta = encode_delta(&encode(drafts));
            replayed = replay_version(
                Some(replayed),
                &state.execution_id,
                next.version,
                next.updated_at,
                &decode_delta(&delta).unwrap(),
                7,
            )
            .unwrap();
            assert_eq!(replayed, next, "after step {step}");
            state = next;
        }
        let snapshot = decode_snapshot(&encode_snapshot(&state), 7).unwrap();
        assert_eq!(snapshot, state);
    }
}
