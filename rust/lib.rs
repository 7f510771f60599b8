//! `wfstate._core`: the Rust core of wfstate.
//!
//! This file holds only the module definition; each concept has its own file:
//! `model` (state, updates, transitions: pure Rust), `ring` (the event ring),
//! `engine` (the state map and the two-phase write), `snapshots` (the snapshot
//! policy's bookkeeping), `sqlite` and `pg` (the stores' native writers), `pump` (the write-behind's
//! step without the GIL), `convert` (Python <-> Rust
//! values, with validation), `py` (the Python classes) and `errors`.

pub mod batch;
pub mod codec;
pub mod convert;
pub mod dl;
pub mod engine;
pub mod errors;
pub mod model;
pub mod pg;
pub mod pump;
pub mod py;
pub mod ring;
pub mod snapshots;
pub mod sqlite;

use pyo3::prelude::*;

// States are persistent maps shared between versions: the hot path allocates and
// frees many small nodes, where mimalloc is several times faster than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule(gil_used = false)]
mod _core {
    #[pymodule_export]
    use crate::batch::{pg_write_parameters, sqlite_write_rows, PyRecordBatch};
    #[pymodule_export]
    use crate::pg::PyPgWriter;
    #[pymodule_export]
    use crate::py::{
        advance, bind_types, decode_data, decode_history, new_execution_id, rebuild, PyCore,
        PyEventCursor, PyNodeState, PyPreparedUpdate, PyStateEvent, PyVersionRecord,
        PyWorkflowState,
    };
    #[pymodule_export]
    use crate::snapshots::PySnapshotTracker;
    #[pymodule_export]
    use crate::sqlite::PySqliteWriter;

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        use crate::py::{
            CRITICAL_ALL, CRITICAL_ERROR, CRITICAL_NODES, CRITICAL_NODE_FAILED, CRITICAL_STATUS,
        };
        m.add("CRITICAL_STATUS", CRITICAL_STATUS)?;
        m.add("CRITICAL_NODE_FAILED", CRITICAL_NODE_FAILED)?;
        m.add("CRITICAL_ERROR", CRITICAL_ERROR)?;
        m.add("CRITICAL_NODES", CRITICAL_NODES)?;
        m.add("CRITICAL_ALL", CRITICAL_ALL)?;
        Ok(())
    }
}
