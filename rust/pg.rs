//! The PostgreSQL store's native write-behind: its batches are written here, without
//! the GIL, through libpq on a connection psycopg opened.
//!
//! Through psycopg every round trip of a batch (BEGIN, the statement, COPY, COMMIT)
//! releases and re-takes the GIL, and with other Python threads applying updates
//! each re-take waits for one of them: the flusher then stored almost nothing while
//! they ran. Here a whole step of the write-behind (read, decide, encode, write,
//! and on through full batches: `pump::step`) is one release of the GIL.
//!
//! Only the libpq copy psycopg uses is ever called: the connection is psycopg's
//! (`PGconn *`, from `pgconn.pgconn_ptr`), so the functions must be that copy's.
//! They are resolved from psycopg's libpq wrapper module (found with `RTLD_NOLOAD`,
//! its version checked against `psycopg.pq.version()`). Where that cannot be done
//! the store writes through psycopg as before.
//!
//! The statements come from the Python store (one text for both paths), with their
//! parameters' names and types; the parameters from `batch::encode_pg_chains`, the
//! encoder of the Python path too. A batch the statement refuses any chain of is
//! rolled back here and left to the Python path, which reports each refusal.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::ptr;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::batch::PyRecordBatch;
use crate::dl;
use crate::pump::{self, Source, Step, Written};
use crate::py::{deadline_after, PyEventCursor};
use crate::snapshots::PySnapshotTracker;

// -- the C API, from the loaded library --------------------------------------------

#[repr(C)]
struct PgConn {
    _private: [u8; 0],
}
#[repr(C)]
struct PgResult {
    _private: [u8; 0],
}

type Oid = c_uint;

const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;
const PGRES_COPY_IN: c_int = 4;
const CONNECTION_OK: c_int = 0;
const PQTRANS_IDLE: c_int = 0;
const PQTRANS_ACTIVE: c_int = 1;
const PG_DIAG_SQLSTATE: c_int = b'C' as c_int;
/// COPY data goes to libpq in pieces of at most this many bytes.
const COPY_CHUNK: usize = 1 << 20;

/// The functions used, resolved from the library with `dlsym`.
struct Api {
    lib_version: unsafe extern "C" fn() -> c_int,
    exec: unsafe extern "C" fn(*mut PgConn, *const c_char) -> *mut PgResult,
    #[allow(clippy::type_complexity)]
    exec_params: unsafe extern "C" fn(
        *mut PgConn,
        *const c_char,
        c_int,
        *const Oid,
        *const *const c_char,
        *const c_int,
        *const c_int,
        c_int,
    ) -> *mut PgResult,
    result_status: unsafe extern "C" fn(*const PgResult) -> c_int,
    ntuples: unsafe extern "C" fn(*const PgResult) -> c_int,
    getisnull: unsafe extern "C" fn(*const PgResult, c_int, c_int) -> c_int,
    cmd_status: unsafe extern "C" fn(*mut PgResult) -> *const c_char,
    clear: unsafe extern "C" fn(*mut PgResult),
    error_message: unsafe extern "C" fn(*const PgConn) -> *const c_char,
    result_error_message: unsafe extern "C" fn(*const PgResult) -> *const c_char,
    result_error_field: unsafe extern "C" fn(*const PgResult, c_int) -> *const c_char,
    put_copy_data: unsafe extern "C" fn(*mut PgConn, *const c_char, c_int) -> c_int,
    put_copy_end: unsafe extern "C" fn(*mut PgConn, *const c_char) -> c_int,
    get_result: unsafe extern "C" fn(*mut PgConn) -> *mut PgResult,
    status: unsafe extern "C" fn(*const PgConn) -> c_int,
    transaction_status: unsafe extern "C" fn(*const PgConn) -> c_int,
    is_nonblocking: unsafe extern "C" fn(*const PgConn) -> c_int,
    set_nonblocking: unsafe extern "C" fn(*mut PgConn, c_int) -> c_int,
}

/// The C API as psycopg's libpq wrapper (`module_path`, loaded already) resolves
/// it: `dlsym` on its handle searches the module and then the libraries it was
/// linked with, so every function is the one psycopg calls.
fn load_api(module_path: &str) -> Result<Api, String> {
    let handle = dl::loaded(module_path)?;
    macro_rules! symbol {
        ($name:literal) => {{
            let name = CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes()).expect("a name");
            let pointer = dl::symbol(Some(handle), name);
            if pointer.is_null() {
                return Err(format!("{module_path} does not reach libpq's {}", $name));
            }
            // SAFETY: the symbol is the libpq function of that name, whose signature
            // the field's type spells out.
            unsafe { dl::function_pointer(pointer) }
        }};
    }
    // psycopg's module binds its libpq calls through the global scope first: a
    // libpq loaded there (RTLD_GLOBAL) before it would be the one it calls, not the
    // one its handle reaches. Two copies cannot be told apart from here: refuse.
    let global = dl::symbol(None, c"PQstatus");
    if !global.is_null() && global != dl::symbol(Some(handle), c"PQstatus") {
        return Err("two copies of libpq are loaded: which one psycopg calls is unknown".into());
    }
    Ok(Api {
        lib_version: symbol!("PQlibVersion"),
        exec: symbol!("PQexec"),
        exec_params: symbol!("PQexecParams"),
        result_status: symbol!("PQresultStatus"),
        ntuples: symbol!("PQntuples"),
        getisnull: symbol!("PQgetisnull"),
        cmd_status: symbol!("PQcmdStatus"),
        clear: symbol!("PQclear"),
        error_message: symbol!("PQerrorMessage"),
        result_error_message: symbol!("PQresultErrorMessage"),
        result_error_field: symbol!("PQresultErrorField"),
        put_copy_data: symbol!("PQputCopyData"),
        put_copy_end: symbol!("PQputCopyEnd"),
        get_result: symbol!("PQgetResult"),
        status: symbol!("PQstatus"),
        transaction_status: symbol!("PQtransactionStatus"),
        is_nonblocking: symbol!("PQisnonblocking"),
        set_nonblocking: symbol!("PQsetnonblocking"),
    })
}

/// The API, loaded once per process.
fn api(module_path: &str) -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Api> = std::sync::OnceLock::new();
    dl::once(&API, || load_api(module_path))
}

// -- one connection's calls ---------------------------------------------------------

fn text(pointer: *const c_char) -> String {
    if pointer.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(pointer) }
            .to_string_lossy()
            .trim()
            .to_string()
    }
}

/// A failed call: libpq's message and the SQLSTATE when the server sent one.
#[derive(Debug)]
struct PgError {
    message: String,
    sqlstate: Option<String>,
}

type PgResultOf<T> = Result<T, PgError>;

/// A result that is cleared when dropped.
struct Res<'a> {
    api: &'a Api,
    pointer: *mut PgResult,
}

impl Drop for Res<'_> {
    fn drop(&mut self) {
        if !self.pointer.is_null() {
            unsafe { (self.api.clear)(self.pointer) };
        }
    }
}

/// psycopg's connection, in blocking mode for the duration (psycopg keeps it
/// non-blocking, where `PQputCopyData` may refuse to wait): restored when dropped.
struct Conn<'a> {
    api: &'a Api,
    pointer: *mut PgConn,
    was_nonblocking: bool,
}

impl<'a> Conn<'a> {
    /// # Safety
    /// `pointer` must be a live `PGconn *` of this libpq copy that nothing else uses
    /// until the `Conn` is dropped.
    unsafe fn new(api: &'a Api, pointer: *mut PgConn) -> Self {
        let was_nonblocking = unsafe { (api.is_nonblocking)(pointer) } == 1;
        if was_nonblocking {
            unsafe { (api.set_nonblocking)(pointer, 0) };
        }
        Conn {
            api,
            pointer,
            was_nonblocking,
        }
    }

    fn error(&self, result: Option<&Res<'_>>) -> PgError {
        let from_result = result
            .filter(|result| !result.pointer.is_null())
            .map(|result| {
                (
                    text(unsafe { (self.api.result_error_message)(result.pointer) }),
                    unsafe { (self.api.result_error_field)(result.pointer, PG_DIAG_SQLSTATE) },
                )
            });
        match from_result {
            Some((message, sqlstate)) if !message.is_empty() => PgError {
                message,
                sqlstate: (!sqlstate.is_null()).then(|| text(sqlstate)),
            },
            _ => {
                let message = text(unsafe { (self.api.error_message)(self.pointer) });
                PgError {
                    message: if message.is_empty() {
                        "the connection was lost".to_string()
                    } else {
                        message
                    },
                    sqlstate: None,
                }
            }
        }
    }

    /// A result of the status wanted, else the error.
    fn expect(&self, pointer: *mut PgResult, wanted: c_int) -> PgResultOf<Res<'a>> {
        let result = Res {
            api: self.api,
            pointer,
        };
        if !pointer.is_null() && unsafe { (self.api.result_status)(pointer) } == wanted {
            Ok(result)
        } else {
            Err(self.error(Some(&result)))
        }
    }

    fn exec(&self, sql: &CStr, wanted: c_int) -> PgResultOf<Res<'a>> {
        self.expect(
            unsafe { (self.api.exec)(self.pointer, sql.as_ptr()) },
            wanted,
        )
    }

    /// The statement with binary parameters (None: NULL), its result in text.
    fn exec_params(
        &self,
        sql: &CStr,
        types: &[Oid],
        values: &[Option<&[u8]>],
    ) -> PgResultOf<Res<'a>> {
        let mut pointers = Vec::with_capacity(values.len());
        let mut lengths = Vec::with_capacity(values.len());
        for value in values {
            match value {
                Some(bytes) => {
                    pointers.push(bytes.as_ptr().cast::<c_char>());
                    lengths.push(length(bytes.len())?);
                }
                None => {
                    pointers.push(ptr::null());
                    lengths.push(0);
                }
            }
        }
        let formats = vec![1 as c_int; values.len()];
        let count = length(values.len())?;
        let result = unsafe {
            (self.api.exec_params)(
                self.pointer,
                sql.as_ptr(),
                count,
                types.as_ptr(),
                pointers.as_ptr(),
                lengths.as_ptr(),
                formats.as_ptr(),
                0,
            )
        };
        self.expect(result, PGRES_TUPLES_OK)
    }

    /// `COPY ... FROM STDIN` with `payload`.
    fn copy_in(&self, sql: &CStr, payload: &[u8]) -> PgResultOf<()> {
        drop(self.exec(sql, PGRES_COPY_IN)?);
        for chunk in payload.chunks(COPY_CHUNK) {
            let sent = unsafe {
                (self.api.put_copy_data)(self.pointer, chunk.as_ptr().cast(), length(chunk.len())?)
            };
            if sent != 1 {
                let error = self.error(None);
                self.end_copy(c"wfstate: sending the COPY data failed");
                return Err(error);
            }
        }
        if unsafe { (self.api.put_copy_end)(self.pointer, ptr::null()) } != 1 {
            return Err(self.error(None));
        }
        let outcome = self
            .expect(
                unsafe { (self.api.get_result)(self.pointer) },
                PGRES_COMMAND_OK,
            )
            .map(drop);
        self.drain();
        outcome
    }

    /// Abort a COPY in progress and read what is left.
    fn end_copy(&self, reason: &CStr) {
        if unsafe { (self.api.put_copy_end)(self.pointer, reason.as_ptr()) } == 1 {
            self.drain();
        }
    }

    /// Read the results left until libpq has none (a COPY's or a failed call's). A
    /// COPY still open is ended first (libpq would return its COPY_IN state forever).
    fn drain(&self) {
        for _ in 0..64 {
            let result = unsafe { (self.api.get_result)(self.pointer) };
            if result.is_null() {
                return;
            }
            let copying = unsafe { (self.api.result_status)(result) } == PGRES_COPY_IN;
            unsafe { (self.api.clear)(result) };
            if unsafe { (self.api.status)(self.pointer) } != CONNECTION_OK {
                return;
            }
            if copying
                && unsafe { (self.api.put_copy_end)(self.pointer, c"wfstate: abandoned".as_ptr()) }
                    != 1
            {
                return;
            }
        }
    }

    /// Roll back a transaction left open by a failure, if the connection still
    /// answers (else the Python store discards it).
    fn abandon(&self) {
        if unsafe { (self.api.status)(self.pointer) } != CONNECTION_OK {
            return;
        }
        if unsafe { (self.api.transaction_status)(self.pointer) } == PQTRANS_ACTIVE {
            self.end_copy(c"wfstate: abandoned");
        }
        if unsafe { (self.api.transaction_status)(self.pointer) } != PQTRANS_IDLE {
            let _ = self.exec(c"ROLLBACK", PGRES_COMMAND_OK);
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if self.was_nonblocking {
            unsafe { (self.api.set_nonblocking)(self.pointer, 1) };
        }
    }
}

fn length(size: usize) -> PgResultOf<c_int> {
    c_int::try_from(size).map_err(|_| PgError {
        message: format!("a parameter of {size} bytes is larger than libpq can send"),
        sqlstate: None,
    })
}

// -- the writer ---------------------------------------------------------------------

/// One shape's statement: its text (`$n` placeholders) and its parameters' names
/// and type OIDs, in `$n` order.
struct Statement {
    text: CString,
    parameters: Vec<(String, Oid)>,
}

/// What a batch's write came to.
enum Outcome {
    /// Committed, every chain written.
    Stored,
    /// The statement refused a chain: rolled back, nothing stored.
    Refused,
    /// The write failed (nothing stored, or unknown when the COMMIT itself failed).
    Failed(PgError),
}

/// A batch's outcome and its snapshot sizes per chain.
struct PgWritten {
    outcome: Outcome,
    sizes: Vec<usize>,
}

impl Written for PgWritten {
    fn stored_whole(&self) -> Option<&[usize]> {
        matches!(self.outcome, Outcome::Stored).then_some(&self.sizes[..])
    }
}

/// The statement shape's key, as the Python store numbers them.
fn shape_key(updates: bool, creations: bool, snapshots: bool, copied: bool) -> u8 {
    u8::from(updates) | u8::from(creations) << 1 | u8::from(snapshots) << 2 | u8::from(copied) << 3
}

/// The PostgreSQL store's native write-behind (see the module docs).
#[pyclass(frozen, module = "wfstate._core", name = "PgWriter")]
pub struct PyPgWriter {
    api: &'static Api,
    statements: HashMap<u8, Statement>,
    copy: CString,
    copy_threshold: usize,
}

impl PyPgWriter {
    /// Write one batch in one transaction. Called without the GIL, on a connection
    /// nothing else uses meanwhile.
    fn write(&self, conn: &Conn<'_>, batch: &PyRecordBatch, flags: &[bool]) -> PgWritten {
        let snapshots = batch.encode_snapshots(flags);
        let sizes = PyRecordBatch::snapshot_sizes(&snapshots);
        let outcome = match self.transaction(conn, batch, &snapshots, &sizes) {
            Ok(outcome) => outcome,
            Err(error) => {
                conn.abandon();
                Outcome::Failed(error)
            }
        };
        PgWritten { outcome, sizes }
    }

    fn transaction(
        &self,
        conn: &Conn<'_>,
        batch: &PyRecordBatch,
        snapshots: &[Option<Vec<u8>>],
        sizes: &[usize],
    ) -> PgResultOf<Outcome> {
        let arrays = batch.encode_pg(snapshots);
        let count = |wanted: &str| {
            arrays
                .iter()
                .find(|(name, _, _)| *name == wanted)
                .map_or(0, |(_, count, _)| *count)
        };
        let by_copy = batch.__len__() >= self.copy_threshold;
        let key = shape_key(
            count("u_id") > 0,
            count("c_id") > 0,
            sizes.iter().any(|size| *size > 0),
            by_copy,
        );
        let statement = self.statements.get(&key).ok_or_else(|| PgError {
            message: format!("no write statement for shape {key}"),
            sqlstate: None,
        })?;
        let by_name: HashMap<&str, &[u8]> = arrays
            .iter()
            .map(|(name, _, bytes)| (*name, &bytes[..]))
            .collect();
        let mut types = Vec::with_capacity(statement.parameters.len());
        let mut values = Vec::with_capacity(statement.parameters.len());
        for (name, oid) in &statement.parameters {
            types.push(*oid);
            values.push(by_name.get(name.as_str()).copied());
        }
        // Everything is encoded before BEGIN: nothing between BEGIN and COMMIT can
        // panic and leave the transaction (and its row locks) open.
        let payload = by_copy.then(|| batch.encode_copy(&HashSet::new()));
        let chains = batch.chain_count();
        drop(conn.exec(c"BEGIN", PGRES_COMMAND_OK)?);
        let rows = conn.exec_params(&statement.text, &types, &values)?;
        let found = unsafe { (conn.api.ntuples)(rows.pointer) };
        // A written chain's row has a NULL version; a refused one's its stored version.
        let written = (0..found)
            .filter(|row| unsafe { (conn.api.getisnull)(rows.pointer, *row, 1) } == 1)
            .count();
        drop(rows);
        if written != chains || usize::try_from(found).ok() != Some(chains) {
            drop(conn.exec(c"ROLLBACK", PGRES_COMMAND_OK)?);
            return Ok(Outcome::Refused);
        }
        if let Some(payload) = &payload {
            conn.copy_in(&self.copy, payload)?;
        }
        let committed = conn.exec(c"COMMIT", PGRES_COMMAND_OK)?;
        // A COMMIT of a failed transaction succeeds as a ROLLBACK.
        let tag = text(unsafe { (conn.api.cmd_status)(committed.pointer) });
        if tag != "COMMIT" {
            return Err(PgError {
                message: format!("the transaction ended in {tag}, not COMMIT"),
                sqlstate: None,
            });
        }
        Ok(Outcome::Stored)
    }
}

#[pymethods]
impl PyPgWriter {
    /// A writer with the store's batch statements: by shape key (`updates | creations
    /// << 1 | snapshots << 2 | deltas by COPY << 3`) the text with `$n` placeholders
    /// and its parameters' (name, type OID) in `$n` order; the deltas' COPY statement
    /// (binary format), used from `copy_threshold` versions on.
    ///
    /// The C API comes from `module_path`, psycopg's libpq wrapper module (its
    /// `__file__`, or the library a ctypes wrapper loaded), as it resolves it.
    /// Raises `ValueError` when that cannot be used (not loaded, no libpq functions
    /// reachable from it, another libpq version than `expected_version`).
    #[new]
    fn new(
        module_path: &str,
        expected_version: c_int,
        statements: HashMap<u8, (String, Vec<(String, Oid)>)>,
        copy_statement: &str,
        copy_threshold: usize,
    ) -> PyResult<Self> {
        let api = api(module_path).map_err(PyValueError::new_err)?;
        let version = unsafe { (api.lib_version)() };
        if version != expected_version {
            return Err(PyValueError::new_err(format!(
                "the libpq reached from {module_path} is version {version}, psycopg's \
                 {expected_version}: not the same copy"
            )));
        }
        let cstring = |text: String| {
            CString::new(text).map_err(|_| PyValueError::new_err("a NUL in a statement"))
        };
        let statements = statements
            .into_iter()
            .map(|(key, (text, parameters))| {
                Ok((
                    key,
                    Statement {
                        text: cstring(text)?,
                        parameters,
                    },
                ))
            })
            .collect::<PyResult<_>>()?;
        Ok(PyPgWriter {
            api,
            statements,
            copy: cstring(copy_statement.to_string())?,
            copy_threshold,
        })
    }

    /// The write-behind's step in one release of the GIL (`pump::step`), writing on
    /// `connection`: the address of a psycopg connection's `PGconn` (its
    /// `pgconn.pgconn_ptr`), idle, in autocommit, which nothing else may use until
    /// this returns.
    ///
    /// Returns `(batch, batch.chains(), snapshot flags, outcome, snapshot sizes,
    /// error, earlier)`: outcome None (nothing written: an empty batch),
    /// `"stored"`, `"refused"` (the statement refused a chain: rolled back, to be
    /// written by the Python path, which reports each refusal) or `"failed"` with
    /// `error` = `(message, SQLSTATE or None)`; `earlier` = `(batches, versions,
    /// dropped)` of the full batches stored whole and taken off the cursor before
    /// the last one, whose cursor position is not committed.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (connection, cursor, tracker, max_events, timeout, skip_before = None, keep_going = 0.0))]
    fn pump<'py>(
        &self,
        py: Python<'py>,
        connection: usize,
        cursor: PyRef<'py, PyEventCursor>,
        tracker: PyRef<'py, PySnapshotTracker>,
        max_events: usize,
        timeout: f64,
        skip_before: Option<HashMap<String, u64>>,
        keep_going: f64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if connection == 0 {
            return Err(PyValueError::new_err("no connection (a NULL PGconn)"));
        }
        let id = cursor.open_id()?;
        let first_deadline = deadline_after(timeout, "timeout")?;
        deadline_after(keep_going, "keep_going")?;
        let source = Source {
            cursor: &cursor,
            id,
            tracker: tracker.tracker(),
            max_events,
            first_deadline,
            keep_going: std::time::Duration::from_secs_f64(keep_going),
            skip_before: skip_before.as_ref(),
        };
        let Step {
            batch,
            chains,
            flags,
            written,
            earlier,
        } = py.detach(|| {
            pump::step(&source, |batch, flags| {
                // SAFETY: the caller's contract (above).
                let conn = unsafe { Conn::new(self.api, connection as *mut PgConn) };
                self.write(&conn, batch, flags)
            })
        })?;
        let none = || py.None().into_bound(py);
        let (outcome, sizes, error) = match written {
            None => (none(), none(), none()),
            Some(PgWritten { outcome, sizes }) => {
                let sizes = sizes.into_pyobject(py)?.into_any();
                match outcome {
                    Outcome::Stored => ("stored".into_pyobject(py)?.into_any(), sizes, none()),
                    Outcome::Refused => ("refused".into_pyobject(py)?.into_any(), sizes, none()),
                    Outcome::Failed(error) => (
                        "failed".into_pyobject(py)?.into_any(),
                        sizes,
                        (error.message, error.sqlstate)
                            .into_pyobject(py)?
                            .into_any(),
                    ),
                }
            }
        };
        PyTuple::new(
            py,
            [
                Bound::new(py, batch)?.into_any(),
                chains.into_pyobject(py)?.into_any(),
                flags.into_pyobject(py)?.into_any(),
                outcome,
                sizes,
                error,
                earlier.into_pyobject(py)?.into_any(),
            ],
        )
    }
}
