//! Python <-> Rust conversion at the boundary, with validation.
//!
//! Every value that enters the core passes through here and leaves as a checked
//! Rust value (JSON, ids, statuses, a parsed `Update`), or as a `ValidationError`
//! naming the offending path. Nothing in here touches the state map.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyDateTime, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple, PyType,
    PyTzInfo,
};
use serde_json::{Map, Number, Value};

use crate::errors::CoreError;
use crate::model::{EventKind, ExecStatus, JsonEntries, NodeStatus, Update};

pub const MAX_ID_CHARS: usize = 255;
pub const MAX_DEPTH: usize = 64;

/// The Python classes the core hands out and recognises, bound once by `wfstate`.
pub struct BoundTypes {
    pub exec_status: Vec<Py<PyAny>>,
    pub node_status: Vec<Py<PyAny>>,
    pub event_type: Vec<Py<PyAny>>,
    pub state_update: Py<PyType>,
    pub exception_to_error: Py<PyAny>,
    pub unset: Py<PyAny>,
}

pub static TYPES: PyOnceLock<BoundTypes> = PyOnceLock::new();

pub fn types(py: Python<'_>) -> PyResult<&BoundTypes> {
    TYPES.get(py).ok_or_else(|| {
        PyTypeError::new_err("wfstate._core is used before `import wfstate` bound its types")
    })
}

// -- ids ---------------------------------------------------------------------------

/// A `str` id of 1 to 255 characters, borrowed from the Python string.
pub fn id_str<'a>(value: &'a Bound<'_, PyAny>, what: &str) -> Result<&'a str, CoreError> {
    let Ok(text) = value.cast::<PyString>() else {
        return Err(CoreError::Validation(format!(
            "{what} must be a str, not {}",
            type_name(value)
        )));
    };
    let text = text
        .to_str()
        .map_err(|_| CoreError::Validation(format!("{what} is not valid Unicode")))?;
    check_id(text, what)?;
    Ok(text)
}

pub fn check_id(text: &str, what: &str) -> Result<(), CoreError> {
    // Byte length bounds the character count from above: skip the count when short.
    if text.is_empty() {
        return Err(CoreError::Validation(format!("{what} must not be empty")));
    }
    if text.len() > MAX_ID_CHARS && text.chars().count() > MAX_ID_CHARS {
        return Err(CoreError::Validation(format!(
            "{what} is longer than {MAX_ID_CHARS} characters"
        )));
    }
    // Ids become text columns: PostgreSQL's text cannot hold NUL, so no store may.
    if text.as_bytes().contains(&0) {
        return Err(CoreError::Validation(format!(
            "{what} contains a NUL character"
        )));
    }
    Ok(())
}

pub fn opt_id(value: Option<&Bound<'_, PyAny>>, what: &str) -> Result<Option<Arc<str>>, CoreError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => Ok(Some(Arc::from(id_str(v, what)?))),
    }
}

pub fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

/// A non-negative int that is not a bool.
pub fn opt_count(value: Option<&Bound<'_, PyAny>>, what: &str) -> Result<Option<u64>, CoreError> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(CoreError::Validation(format!(
            "{what} must be an int, not {}",
            type_name(value)
        )));
    }
    match value.extract::<u64>() {
        Ok(count) => Ok(Some(count)),
        Err(_) if value.lt(0).unwrap_or(false) => Err(CoreError::Validation(format!(
            "{what} must not be negative, got {value}"
        ))),
        // Beyond 64 bits: larger than any version or count can be.
        Err(_) => Ok(Some(u64::MAX)),
    }
}

// -- JSON --------------------------------------------------------------------------

struct JsonError {
    /// Path segments, innermost first (pushed while unwinding).
    path: Vec<String>,
    message: String,
}

impl JsonError {
    fn new(message: String) -> Self {
        JsonError {
            path: Vec::new(),
            message,
        }
    }

    fn at(mut self, segment: String) -> Self {
        self.path.push(segment);
        self
    }

    fn into_core(self, root: &str) -> CoreError {
        let mut where_ = root.to_string();
        for segment in self.path.iter().rev() {
            where_.push_str(segment);
        }
        CoreError::Validation(format!("{where_}: {}", self.message))
    }
}

/// The length of `text` as a JSON string literal, quotes and escapes included.
fn json_str_len(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    text.len() + 2 + escapes
}

fn too_deep() -> JsonError {
    JsonError::new(format!("nested deeper than {MAX_DEPTH} levels"))
}

/// `depth` is the number of containers around `value`; the 65th nested container is
/// refused, whatever it holds.
fn to_json(value: &Bound<'_, PyAny>, depth: usize, size: &mut usize) -> Result<Value, JsonError> {
    if value.is_none() {
        *size += 4;
        return Ok(Value::Null);
    }
    if let Ok(text) = value.cast::<PyString>() {
        let text = text
            .to_str()
            .map_err(|_| JsonError::new("a str that is not valid Unicode".into()))?;
        *size += json_str_len(text);
        return Ok(Value::String(text.to_owned()));
    }
    if let Ok(flag) = value.cast::<PyBool>() {
        let flag = flag.is_true();
        *size += if flag { 4 } else { 5 };
        return Ok(Value::Bool(flag));
    }
    if value.is_instance_of::<PyInt>() {
        let number = if let Ok(n) = value.extract::<i64>() {
            Number::from(n)
        } else if let Ok(n) = value.extract::<u64>() {
            Number::from(n)
        } else {
            return Err(JsonError::new(format!(
                "the int {value} does not fit in 64 bits"
            )));
        };
        *size += number.to_string().len();
        return Ok(Value::Number(number));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        let float = float.value();
        let Some(number) = Number::from_f64(float) else {
            return Err(JsonError::new(format!("{float} is not a JSON number")));
        };
        *size += number.to_string().len();
        return Ok(Value::Number(number));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        return dict_to_json(dict, depth, size);
    }
    if let Ok(list) = value.cast::<PyList>() {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        return seq_to_json(list.iter(), list.len(), depth, size);
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        return seq_to_json(tuple.iter(), tuple.len(), depth, size);
    }
    Err(JsonError::new(format!(
        "a {} is not a JSON value",
        type_name(value)
    )))
}

fn seq_to_json<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    depth: usize,
    size: &mut usize,
) -> Result<Value, JsonError> {
    let mut array = Vec::with_capacity(len);
    *size += 2 + len.saturating_sub(1);
    for (position, item) in items.enumerate() {
        array.push(to_json(&item, depth + 1, size).map_err(|e| e.at(format!("[{position}]")))?);
    }
    Ok(Value::Array(array))
}

fn dict_key(key: &Bound<'_, PyAny>) -> Result<String, JsonError> {
    match key.cast::<PyString>() {
        Ok(text) => text
            .to_str()
            .map(str::to_owned)
            .map_err(|_| JsonError::new("a key that is not valid Unicode".into())),
        Err(_) => Err(JsonError::new(format!(
            "the key {} is a {}, not a str",
            key.repr().map(|r| r.to_string()).unwrap_or_default(),
            type_name(key)
        ))),
    }
}

fn dict_to_json(
    dict: &Bound<'_, PyDict>,
    depth: usize,
    size: &mut usize,
) -> Result<Value, JsonError> {
    let mut object = Map::with_capacity(dict.len());
    *size += 2 + dict.len().saturating_sub(1);
    for (key, item) in dict.iter() {
        let key = dict_key(&key)?;
        *size += json_str_len(&key) + 1;
        let item = to_json(&item, depth + 1, size).map_err(|e| e.at(format!("[{key:?}]")))?;
        object.insert(key, item);
    }
    Ok(Value::Object(object))
}

/// A dict (or any mapping) as a dict, for the top-level maps of an update.
fn as_dict<'py>(value: &Bound<'py, PyAny>, what: &str) -> Result<Bound<'py, PyDict>, CoreError> {
    if let Ok(dict) = value.cast::<PyDict>() {
        return Ok(dict.clone());
    }
    if value.cast::<PyMapping>().is_ok() {
        let dict = PyDict::new(value.py());
        dict.update(value.cast::<PyMapping>().expect("checked"))
            .map_err(|e| CoreError::Validation(format!("{what}: {e}")))?;
        return Ok(dict);
    }
    Err(CoreError::Validation(format!(
        "{what} must be a dict, not {}",
        type_name(value)
    )))
}

/// A top-level JSON map (variables, context): name -> value, in the given order.
pub fn json_entries(
    value: Option<&Bound<'_, PyAny>>,
    what: &str,
    size: &mut usize,
) -> Result<Option<JsonEntries>, CoreError> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let dict = as_dict(value, what)?;
    let mut entries = Vec::with_capacity(dict.len());
    // The map counts as its compact JSON: braces, `"key":value`, commas.
    *size += 2 + dict.len().saturating_sub(1);
    for (key, item) in dict.iter() {
        let key = dict_key(&key).map_err(|e| e.into_core(what))?;
        *size += json_str_len(&key) + 1;
        let item =
            to_json(&item, 0, size).map_err(|e| e.at(format!("[{key:?}]")).into_core(what))?;
        entries.push((Arc::from(key), Arc::new(item)));
    }
    Ok(Some(entries))
}

/// Any JSON value, checked.
pub fn json_value(
    value: &Bound<'_, PyAny>,
    what: &str,
    size: &mut usize,
) -> Result<Value, CoreError> {
    to_json(value, 0, size).map_err(|e| e.into_core(what))
}

pub fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
        Value::Number(number) => {
            if let Some(n) = number.as_i64() {
                n.into_pyobject(py)?.into_any()
            } else if let Some(n) = number.as_u64() {
                n.into_pyobject(py)?.into_any()
            } else {
                number
                    .as_f64()
                    .unwrap_or(f64::NAN)
                    .into_pyobject(py)?
                    .into_any()
            }
        }
        Value::String(text) => PyString::new(py, text).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(object) => {
            let dict = PyDict::new(py);
            for (key, item) in object {
                dict.set_item(key, json_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

// -- statuses and times --------------------------------------------------------------

fn status_text<'a>(value: &'a Bound<'_, PyAny>, what: &str) -> Result<&'a str, CoreError> {
    // A StrEnum member is a str whose value is the member's value.
    value
        .cast::<PyString>()
        .ok()
        .and_then(|s| s.to_str().ok())
        .ok_or_else(|| {
            CoreError::Validation(format!(
                "{what} must be a status or its string value, not {}",
                type_name(value)
            ))
        })
}

pub fn exec_status(value: &Bound<'_, PyAny>, what: &str) -> Result<ExecStatus, CoreError> {
    let text = status_text(value, what)?;
    ExecStatus::parse(text).ok_or_else(|| {
        CoreError::Validation(format!(
            "{what}: unknown execution status {text:?} (one of running, suspended, completed, failed, cancelled)"
        ))
    })
}

pub fn node_status(value: &Bound<'_, PyAny>, what: &str) -> Result<NodeStatus, CoreError> {
    let text = status_text(value, what)?;
    NodeStatus::parse(text).ok_or_else(|| {
        CoreError::Validation(format!(
            "{what}: unknown node status {text:?} (one of pending, running, completed, failed, skipped)"
        ))
    })
}

pub fn event_kind(value: &Bound<'_, PyAny>) -> Result<EventKind, CoreError> {
    let text = status_text(value, "types")?;
    EventKind::parse(text)
        .ok_or_else(|| CoreError::Validation(format!("types: unknown event type {text:?}")))
}

/// `days` since 1970-01-01 -> (year, month, day); Howard Hinnant's civil_from_days.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

pub fn datetime_from_micros(py: Python<'_>, micros: i64) -> PyResult<Bound<'_, PyDateTime>> {
    const DAY: i64 = 86_400_000_000;
    let (year, month, day) = civil_from_days(micros.div_euclid(DAY));
    let in_day = micros.rem_euclid(DAY);
    let seconds = in_day / 1_000_000;
    let utc = PyTzInfo::utc(py)?;
    PyDateTime::new(
        py,
        year,
        month,
        day,
        (seconds / 3600) as u8,
        (seconds / 60 % 60) as u8,
        (seconds % 60) as u8,
        (in_day % 1_000_000) as u32,
        Some(&utc),
    )
}

pub fn opt_datetime(py: Python<'_>, micros: Option<i64>) -> PyResult<Bound<'_, PyAny>> {
    match micros {
        Some(micros) => Ok(datetime_from_micros(py, micros)?.into_any()),
        None => Ok(py.None().into_bound(py)),
    }
}

// -- updates -----------------------------------------------------------------------

const UPDATE_FIELDS: [&str; 8] = [
    "status",
    "current_node",
    "variables",
    "unset_variables",
    "context",
    "nodes",
    "error",
    "metrics",
];

const METRIC_KEYS: [&str; 3] = ["duration", "cpu_time", "peak_memory"];

/// Parse a `StateUpdate` or a dict into an `Update`, checking every value.
fn given<'py>(field: Option<Bound<'py, PyAny>>) -> Option<Bound<'py, PyAny>> {
    field.filter(|v| !v.is_none())
}

pub fn parse_update<'py>(
    py: Python<'py>,
    update: &Bound<'py, PyAny>,
    max_update_bytes: usize,
) -> PyResult<Update> {
    let types = types(py)?;
    let mut fields: [Option<Bound<'py, PyAny>>; 8] = Default::default();
    if let Ok(dict) = update.cast::<PyDict>() {
        for (key, value) in dict.iter() {
            let name = key
                .cast::<PyString>()
                .ok()
                .and_then(|k| k.to_str().ok().map(str::to_owned));
            let position = name
                .as_deref()
                .and_then(|name| UPDATE_FIELDS.iter().position(|field| *field == name));
            match position {
                Some(position) => fields[position] = Some(value),
                None => {
                    return Err(CoreError::Validation(format!(
                        "unknown update field {} (known: {})",
                        key.repr().map(|r| r.to_string()).unwrap_or_default(),
                        UPDATE_FIELDS.join(", ")
                    ))
                    .into())
                }
            }
        }
    } else if update.is_instance(types.state_update.bind(py))? {
        for (slot, name) in fields.iter_mut().zip(UPDATE_FIELDS) {
            *slot = Some(update.getattr(name)?);
        }
    } else {
        return Err(CoreError::Validation(format!(
            "an update must be a StateUpdate or a dict, not {}",
            type_name(update)
        ))
        .into());
    }
    let [status, current_node, variables, unset_variables, context, nodes, error, metrics] = fields;
    let unset = types.unset.bind(py);
    let mut size = 0usize;

    let mut parsed = Update {
        status: given(status)
            .map(|s| exec_status(&s, "status"))
            .transpose()?,
        ..Update::default()
    };
    if let Some(node) = current_node.filter(|v| !v.is(unset)) {
        parsed.current_node = Some(opt_id(Some(&node), "current_node")?);
    }
    parsed.variables = json_entries(variables.as_ref(), "variables", &mut size)?;
    if let Some(names) = given(unset_variables) {
        if names.is_instance_of::<PyString>() || names.cast::<PyDict>().is_ok() {
            return Err(CoreError::Validation(
                "unset_variables must be a collection of names, not a str or dict".into(),
            )
            .into());
        }
        let iter = names.try_iter().map_err(|_| {
            CoreError::Validation(format!(
                "unset_variables must be a collection of names, not {}",
                type_name(&names)
            ))
        })?;
        let mut list = Vec::new();
        for name in iter {
            let name = name?;
            let text = name
                .cast::<PyString>()
                .ok()
                .and_then(|s| s.to_str().ok())
                .ok_or_else(|| {
                    CoreError::Validation(format!(
                        "unset_variables holds a {}, not a str",
                        type_name(&name)
                    ))
                })?;
            list.push(Arc::from(text));
        }
        parsed.unset_variables = Some(list);
    }
    parsed.context = json_entries(context.as_ref(), "context", &mut size)?;
    if let Some(nodes) = given(nodes) {
        let dict = as_dict(&nodes, "nodes")?;
        let mut list = Vec::with_capacity(dict.len());
        for (node_id, status) in dict.iter() {
            let node_id = id_str(&node_id, "a node id")?;
            let status = node_status(&status, &format!("nodes[{node_id:?}]"))?;
            list.push((Arc::from(node_id), status));
        }
        // An empty map changes nothing and records nothing: as if not given.
        parsed.nodes = (!list.is_empty()).then_some(list);
    }
    if let Some(error) = given(error) {
        parsed.error = Some(Arc::new(error_record(py, &error, &mut size)?));
    }
    if let Some(metrics) = given(metrics) {
        let dict = as_dict(&metrics, "metrics")?;
        let mut list = Vec::with_capacity(dict.len());
        size += 2 + dict.len().saturating_sub(1);
        for (node_id, figures) in dict.iter() {
            let node_id = id_str(&node_id, "a node id in metrics")?;
            let what = format!("metrics[{node_id:?}]");
            let figures = as_dict(&figures, &what)?;
            size += json_str_len(node_id) + 1 + 2 + figures.len().saturating_sub(1);
            let mut object = Map::with_capacity(figures.len());
            for (key, figure) in figures.iter() {
                let key = dict_key(&key).map_err(|e| e.into_core(&what))?;
                if !METRIC_KEYS.contains(&key.as_str()) {
                    return Err(CoreError::Validation(format!(
                        "{what}: unknown metric {key:?} (known: {})",
                        METRIC_KEYS.join(", ")
                    ))
                    .into());
                }
                let number = if figure.is_instance_of::<PyBool>() {
                    None
                } else if figure.is_instance_of::<PyInt>() || figure.is_instance_of::<PyFloat>() {
                    json_value(&figure, &what, &mut size).ok()
                } else {
                    None
                };
                let number = number
                    .filter(|n| n.as_f64().is_some_and(|f| f >= 0.0))
                    .ok_or_else(|| {
                        CoreError::Validation(format!(
                            "{what}[{key:?}] must be a non-negative number, not {}",
                            figure.repr().map(|r| r.to_string()).unwrap_or_default()
                        ))
                    })?;
                size += json_str_len(&key) + 1;
                object.insert(key, number);
            }
            list.push((Arc::from(node_id), Value::Object(object)));
        }
        parsed.metrics = (!list.is_empty()).then_some(list);
    }
    check_size(size, max_update_bytes)?;
    parsed.check_shape()?;
    Ok(parsed)
}

pub fn check_size(size: usize, max_update_bytes: usize) -> Result<(), CoreError> {
    if size > max_update_bytes {
        return Err(CoreError::Validation(format!(
            "the update's data is {size} bytes of JSON, over the limit of {max_update_bytes} (max_update_bytes)"
        )));
    }
    Ok(())
}

fn error_record(py: Python<'_>, error: &Bound<'_, PyAny>, size: &mut usize) -> PyResult<Value> {
    let record = if error.is_instance_of::<pyo3::exceptions::PyBaseException>() {
        types(py)?.exception_to_error.bind(py).call1((error,))?
    } else {
        error.clone()
    };
    let dict = as_dict(&record, "error")?;
    let mut object = Map::with_capacity(3);
    for (key, value) in dict.iter() {
        let key = dict_key(&key).map_err(|e| e.into_core("error"))?;
        match key.as_str() {
            "type" | "message" => {
                let text = value
                    .cast::<PyString>()
                    .ok()
                    .and_then(|s| s.to_str().ok())
                    .ok_or_else(|| {
                        CoreError::Validation(format!(
                            "error[{key:?}] must be a str, not {}",
                            type_name(&value)
                        ))
                    })?;
                object.insert(key, Value::String(text.to_owned()));
            }
            "details" => {
                // Sized below, with the rest of the normalised record.
                let mut ignored = 0;
                let details = to_json(&value, 0, &mut ignored)
                    .map_err(|e| e.into_core("error[\"details\"]"))?;
                object.insert(key, details);
            }
            _ => {
                return Err(CoreError::Validation(format!(
                    "error: unknown key {key:?} (known: type, message, details)"
                ))
                .into())
            }
        }
    }
    for required in ["type", "message"] {
        if !object.contains_key(required) {
            return Err(CoreError::Validation(format!("error must have a {required:?}")).into());
        }
    }
    let mut ordered = Map::with_capacity(3);
    for key in ["type", "message", "details"] {
        ordered.insert(key.to_string(), object.remove(key).unwrap_or(Value::Null));
    }
    let record = Value::Object(ordered);
    // Counted as the compact JSON of the normalised record.
    *size += serde_json::to_vec(&record).map_or(0, |bytes| bytes.len());
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn json_string_lengths_count_escapes() {
        assert_eq!(json_str_len("ab"), 4);
        assert_eq!(json_str_len("a\"b"), 6);
        assert_eq!(json_str_len("\u{1}"), 8);
    }
}
