//! One error type for the whole core, mapped onto the classes of `wfstate.errors`.
//!
//! The Python classes are imported from `wfstate.errors` (cryptography's
//! `import_exception!` pattern), so Python code catches exactly the classes it sees
//! documented; this module never builds a bare `PyException`.

use std::fmt;

use pyo3::prelude::*;
use pyo3::PyErr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreError {
    Validation(String),
    NotFound(String),
    AlreadyExists(String),
    Conflict {
        execution_id: String,
        expected: u64,
        actual: u64,
    },
    InvalidTransition(String),
    HistoryEvicted(String),
    Backpressure(String),
    /// The ring has no room for `needed` events yet; the caller may wait and retry.
    RingFull {
        needed: usize,
    },
    Closed(String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Validation(msg)
            | CoreError::NotFound(msg)
            | CoreError::AlreadyExists(msg)
            | CoreError::InvalidTransition(msg)
            | CoreError::HistoryEvicted(msg)
            | CoreError::Backpressure(msg)
            | CoreError::Closed(msg) => f.write_str(msg),
            CoreError::Conflict {
                execution_id,
                expected,
                actual,
            } => write!(
                f,
                "version conflict on execution {execution_id:?}: expected version {expected}, found {actual}"
            ),
            CoreError::RingFull { needed } => write!(
                f,
                "the event ring has no room for {needed} more events: a durable reader has not taken the oldest ones"
            ),
        }
    }
}

impl std::error::Error for CoreError {}

mod py_errors {
    pyo3::import_exception!(wfstate.errors, ValidationError);
    pyo3::import_exception!(wfstate.errors, NotFoundError);
    pyo3::import_exception!(wfstate.errors, AlreadyExistsError);
    pyo3::import_exception!(wfstate.errors, ConflictError);
    pyo3::import_exception!(wfstate.errors, InvalidTransitionError);
    pyo3::import_exception!(wfstate.errors, HistoryEvictedError);
    pyo3::import_exception!(wfstate.errors, BackpressureError);
    pyo3::import_exception!(wfstate.errors, ClosedError);
}

impl From<CoreError> for PyErr {
    fn from(error: CoreError) -> PyErr {
        use py_errors::*;
        match error {
            CoreError::Validation(msg) => ValidationError::new_err(msg),
            CoreError::NotFound(msg) => NotFoundError::new_err(msg),
            CoreError::AlreadyExists(msg) => AlreadyExistsError::new_err(msg),
            CoreError::Conflict {
                execution_id,
                expected,
                actual,
            } => ConflictError::new_err((execution_id, expected, actual)),
            CoreError::InvalidTransition(msg) => InvalidTransitionError::new_err(msg),
            CoreError::HistoryEvicted(msg) => HistoryEvictedError::new_err(msg),
            CoreError::Backpressure(msg) => BackpressureError::new_err(msg),
            error @ CoreError::RingFull { .. } => BackpressureError::new_err(error.to_string()),
            CoreError::Closed(msg) => ClosedError::new_err(msg),
        }
    }
}

/// A `ConflictError` whose expected version is a Python int (it may not fit a u64).
pub fn conflict_error(
    _py: Python<'_>,
    execution_id: &str,
    expected: &Bound<'_, PyAny>,
    actual: u64,
) -> PyErr {
    py_errors::ConflictError::new_err((execution_id.to_string(), expected.clone().unbind(), actual))
}
