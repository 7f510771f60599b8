//! The SQLite store's native writer: its write transactions run here, without the
//! GIL, on a connection of the SQLite library the `sqlite3` module already loaded.
//!
//! Through the `sqlite3` module every statement step releases and re-takes the GIL.
//! A sync write is 4 to 6 steps and a group commit's many more; with other Python
//! threads running, each re-take waits for one of them. Here a whole transaction is
//! one release of the GIL.
//!
//! Only the library copy the `sqlite3` module uses is ever called (found with
//! `RTLD_NOLOAD`, its version checked against `sqlite3.sqlite_version`): two copies
//! of SQLite in one process do not see each other's POSIX locks, and closing a file
//! in one would drop the other's locks. Where that copy cannot be found (SQLite
//! linked into the `sqlite3` module itself, a platform without `dlopen`) the store
//! writes through the `sqlite3` module as before.
//!
//! The statements come from the Python store (one text for both paths); the rows
//! from `batch::sqlite_chain_rows`, the encoder of the Python path too.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::batch::{sqlite_chain_rows, ChainView, PyRecordBatch, RowKind, SqlValue, SyncItem};
use crate::dl;
use crate::pump::{self, Source, Step, Written};
use crate::py::{deadline_after, version_record, PyCore, PyEventCursor};
use crate::snapshots::PySnapshotTracker;

// -- the C API, from the loaded library --------------------------------------------

#[repr(C)]
struct Sqlite3 {
    _private: [u8; 0],
}
#[repr(C)]
struct Stmt {
    _private: [u8; 0],
}

const SQLITE_OK: c_int = 0;
const SQLITE_ROW: c_int = 100;
const SQLITE_DONE: c_int = 101;
const SQLITE_NULL: c_int = 5;
const SQLITE_OPEN_READWRITE: c_int = 0x0000_0002;
const SQLITE_OPEN_NOMUTEX: c_int = 0x0000_8000;
const SQLITE_OPEN_EXRESCODE: c_int = 0x0200_0000;

type Destructor = Option<unsafe extern "C" fn(*mut c_void)>;

/// The functions used, resolved from the library with `dlsym`.
struct Api {
    libversion: unsafe extern "C" fn() -> *const c_char,
    open_v2: unsafe extern "C" fn(*const c_char, *mut *mut Sqlite3, c_int, *const c_char) -> c_int,
    close_v2: unsafe extern "C" fn(*mut Sqlite3) -> c_int,
    busy_timeout: unsafe extern "C" fn(*mut Sqlite3, c_int) -> c_int,
    exec: unsafe extern "C" fn(
        *mut Sqlite3,
        *const c_char,
        *const c_void,
        *const c_void,
        *mut *mut c_char,
    ) -> c_int,
    prepare_v2: unsafe extern "C" fn(
        *mut Sqlite3,
        *const c_char,
        c_int,
        *mut *mut Stmt,
        *mut *const c_char,
    ) -> c_int,
    step: unsafe extern "C" fn(*mut Stmt) -> c_int,
    reset: unsafe extern "C" fn(*mut Stmt) -> c_int,
    clear_bindings: unsafe extern "C" fn(*mut Stmt) -> c_int,
    finalize: unsafe extern "C" fn(*mut Stmt) -> c_int,
    bind_int64: unsafe extern "C" fn(*mut Stmt, c_int, i64) -> c_int,
    bind_null: unsafe extern "C" fn(*mut Stmt, c_int) -> c_int,
    bind_text: unsafe extern "C" fn(*mut Stmt, c_int, *const c_char, c_int, Destructor) -> c_int,
    bind_blob: unsafe extern "C" fn(*mut Stmt, c_int, *const c_void, c_int, Destructor) -> c_int,
    column_type: unsafe extern "C" fn(*mut Stmt, c_int) -> c_int,
    column_int64: unsafe extern "C" fn(*mut Stmt, c_int) -> i64,
    column_blob: unsafe extern "C" fn(*mut Stmt, c_int) -> *const c_void,
    column_text: unsafe extern "C" fn(*mut Stmt, c_int) -> *const u8,
    column_bytes: unsafe extern "C" fn(*mut Stmt, c_int) -> c_int,
    changes: unsafe extern "C" fn(*mut Sqlite3) -> c_int,
    get_autocommit: unsafe extern "C" fn(*mut Sqlite3) -> c_int,
    errmsg: unsafe extern "C" fn(*mut Sqlite3) -> *const c_char,
    extended_errcode: unsafe extern "C" fn(*mut Sqlite3) -> c_int,
}

/// The C API as the `sqlite3` module's extension (`module_path`, loaded already)
/// resolves it: `dlsym` on its handle searches the extension and then the libraries
/// it was linked with, so every function is the one that module calls.
fn load_api(module_path: &str) -> Result<Api, String> {
    let handle = dl::loaded(module_path)?;
    macro_rules! symbol {
        ($name:literal) => {{
            let name = CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes()).expect("a name");
            let pointer = dl::symbol(Some(handle), name);
            if pointer.is_null() {
                return Err(format!(
                    "the sqlite3 module does not export {} (SQLite linked into it)",
                    $name
                ));
            }
            // SAFETY: the symbol is the SQLite C API function of that name, whose
            // signature the field's type spells out.
            unsafe { dl::function_pointer(pointer) }
        }};
    }
    let threadsafe: unsafe extern "C" fn() -> c_int = symbol!("sqlite3_threadsafe");
    if unsafe { threadsafe() } == 0 {
        return Err("the SQLite library is built without thread support".to_string());
    }
    Ok(Api {
        libversion: symbol!("sqlite3_libversion"),
        open_v2: symbol!("sqlite3_open_v2"),
        close_v2: symbol!("sqlite3_close_v2"),
        busy_timeout: symbol!("sqlite3_busy_timeout"),
        exec: symbol!("sqlite3_exec"),
        prepare_v2: symbol!("sqlite3_prepare_v2"),
        step: symbol!("sqlite3_step"),
        reset: symbol!("sqlite3_reset"),
        clear_bindings: symbol!("sqlite3_clear_bindings"),
        finalize: symbol!("sqlite3_finalize"),
        bind_int64: symbol!("sqlite3_bind_int64"),
        bind_null: symbol!("sqlite3_bind_null"),
        bind_text: symbol!("sqlite3_bind_text"),
        bind_blob: symbol!("sqlite3_bind_blob"),
        column_type: symbol!("sqlite3_column_type"),
        column_int64: symbol!("sqlite3_column_int64"),
        column_blob: symbol!("sqlite3_column_blob"),
        column_text: symbol!("sqlite3_column_text"),
        column_bytes: symbol!("sqlite3_column_bytes"),
        changes: symbol!("sqlite3_changes"),
        get_autocommit: symbol!("sqlite3_get_autocommit"),
        errmsg: symbol!("sqlite3_errmsg"),
        extended_errcode: symbol!("sqlite3_extended_errcode"),
    })
}

/// The API, loaded once per process (the first time it loads; a failure is not
/// kept, so another module path may still succeed).
fn api(module_path: &str) -> Result<&'static Api, String> {
    static API: OnceLock<Api> = OnceLock::new();
    dl::once(&API, || load_api(module_path))
}

// -- errors -------------------------------------------------------------------------

/// A failed SQLite call: its extended result code and message.
#[derive(Debug, Clone)]
struct SqlError {
    code: c_int,
    message: String,
}

impl SqlError {
    /// As the `sqlite3` module raises it: its exception class for the primary code,
    /// with `sqlite_errorcode` (the extended code) and `sqlite_errorname` (the
    /// primary code's name), so that the store's retry and wording treat both paths
    /// alike.
    fn into_py(self, py: Python<'_>) -> PyErr {
        let build = || -> PyResult<PyErr> {
            let module = py.import("sqlite3")?;
            let primary = self.code & 0xFF;
            let class = match primary {
                2 | 12 => "InternalError",
                11 => "DatabaseError",
                18 => "DataError",
                19 | 20 => "IntegrityError",
                21 | 25 => "InterfaceError",
                1 | 3..=10 | 13..=17 => "OperationalError",
                _ => "DatabaseError",
            };
            let error = module.getattr(class)?.call1((self.message.as_str(),))?;
            error.setattr("sqlite_errorcode", self.code)?;
            error.setattr("sqlite_errorname", primary_name(primary))?;
            Ok(PyErr::from_value(error))
        };
        build().unwrap_or_else(|error| error)
    }
}

/// The name of a primary result code, as `sqlite3.Error.sqlite_errorname` gives it.
fn primary_name(code: c_int) -> String {
    const NAMES: [&str; 29] = [
        "OK",
        "ERROR",
        "INTERNAL",
        "PERM",
        "ABORT",
        "BUSY",
        "LOCKED",
        "NOMEM",
        "READONLY",
        "INTERRUPT",
        "IOERR",
        "CORRUPT",
        "NOTFOUND",
        "FULL",
        "CANTOPEN",
        "PROTOCOL",
        "EMPTY",
        "SCHEMA",
        "TOOBIG",
        "CONSTRAINT",
        "MISMATCH",
        "MISUSE",
        "NOLFS",
        "AUTH",
        "FORMAT",
        "RANGE",
        "NOTADB",
        "NOTICE",
        "WARNING",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|index| NAMES.get(index))
        .map_or_else(
            || format!("SQLITE_UNKNOWN_{code}"),
            |name| format!("SQLITE_{name}"),
        )
}

type SqlResult<T> = Result<T, SqlError>;

// -- the connection -----------------------------------------------------------------

/// The statements the writer prepares, by the names the Python store gives them.
const STATEMENTS: [&str; 8] = [
    "insert_execution",
    "update_execution",
    "update_execution_keep_status",
    "insert_delta",
    "insert_snapshot",
    "select_lease",
    "select_version_and_snapshot",
    "select_newer_deltas",
];

struct Connection {
    api: &'static Api,
    db: *mut Sqlite3,
    /// Prepared once, in `STATEMENTS` order, then `begin`, `commit`, `rollback`.
    statements: Vec<*mut Stmt>,
}

// SAFETY: the connection is only used under the writer's mutex, by one thread at a
// time; SQLite connections may move between threads (the library is built
// thread-safe: checked at load).
unsafe impl Send for Connection {}

const BEGIN: usize = STATEMENTS.len();
const COMMIT: usize = BEGIN + 1;
const ROLLBACK: usize = BEGIN + 2;

fn statement_index(name: &str) -> usize {
    STATEMENTS
        .iter()
        .position(|n| *n == name)
        .expect("a known statement")
}

impl Connection {
    fn error(&self) -> SqlError {
        unsafe {
            SqlError {
                code: (self.api.extended_errcode)(self.db),
                message: CStr::from_ptr((self.api.errmsg)(self.db))
                    .to_string_lossy()
                    .into_owned(),
            }
        }
    }

    fn check(&self, code: c_int) -> SqlResult<()> {
        if code == SQLITE_OK {
            Ok(())
        } else {
            Err(self.error())
        }
    }

    fn open(
        api: &'static Api,
        path: &str,
        statements: &HashMap<String, String>,
        pragmas: &[String],
        busy_timeout_ms: c_int,
    ) -> SqlResult<Connection> {
        let c_path = CString::new(path).map_err(|_| SqlError {
            code: 1,
            message: "the path holds a NUL character".to_string(),
        })?;
        let mut db = std::ptr::null_mut();
        let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE;
        let code = unsafe { (api.open_v2)(c_path.as_ptr(), &mut db, flags, std::ptr::null()) };
        let mut connection = Connection {
            api,
            db,
            statements: Vec::new(),
        };
        if db.is_null() {
            return Err(SqlError {
                code,
                message: "out of memory opening the database".to_string(),
            });
        }
        connection.check(code)?;
        connection.check(unsafe { (api.busy_timeout)(db, busy_timeout_ms) })?;
        for pragma in pragmas {
            connection.exec(pragma)?;
        }
        let fixed = ["BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"];
        let texts = STATEMENTS
            .iter()
            .map(|name| {
                statements.get(*name).map(String::as_str).ok_or(SqlError {
                    code: 1,
                    message: format!("no {name} statement given"),
                })
            })
            .chain(fixed.iter().map(|s| Ok(*s)));
        for text in texts {
            let statement = connection.prepare(text?)?;
            connection.statements.push(statement);
        }
        Ok(connection)
    }

    fn exec(&self, sql: &str) -> SqlResult<()> {
        let sql = CString::new(sql).map_err(|_| SqlError {
            code: 1,
            message: "a statement holds a NUL character".to_string(),
        })?;
        let code = unsafe {
            (self.api.exec)(
                self.db,
                sql.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null_mut(),
            )
        };
        self.check(code)
    }

    fn prepare(&self, sql: &str) -> SqlResult<*mut Stmt> {
        let mut statement = std::ptr::null_mut();
        let length = c_int::try_from(sql.len()).expect("a statement's text fits in an int");
        let code = unsafe {
            (self.api.prepare_v2)(
                self.db,
                sql.as_ptr().cast(),
                length,
                &mut statement,
                std::ptr::null_mut(),
            )
        };
        self.check(code)?;
        Ok(statement)
    }

    /// Bind `values` to statement `index` and step it once; return whether it gave a
    /// row (read it with `column_*`, then `finish`).
    fn run(&self, index: usize, values: &[SqlValue<'_>]) -> SqlResult<bool> {
        let statement = self.statements[index];
        let api = self.api;
        // Sizes checked before anything is bound (an early return leaves no binding).
        values.iter().try_for_each(|value| match value {
            SqlValue::Text(text) => length(text.len()).map(drop),
            SqlValue::Blob(bytes) => length(bytes.len()).map(drop),
            SqlValue::Null | SqlValue::Int(_) => Ok(()),
        })?;
        for (position, value) in values.iter().enumerate() {
            let position = c_int::try_from(position + 1).expect("few parameters");
            // SQLITE_STATIC (None): the values outlive the step; `finish` clears them.
            let code = unsafe {
                match value {
                    SqlValue::Null => (api.bind_null)(statement, position),
                    SqlValue::Int(n) => (api.bind_int64)(statement, position, *n),
                    SqlValue::Text(text) => (api.bind_text)(
                        statement,
                        position,
                        text.as_ptr().cast(),
                        length(text.len()).unwrap_or(0),
                        None,
                    ),
                    SqlValue::Blob(bytes) => (api.bind_blob)(
                        statement,
                        position,
                        bytes.as_ptr().cast(),
                        length(bytes.len()).unwrap_or(0),
                        None,
                    ),
                }
            };
            if code != SQLITE_OK {
                self.finish(index);
                return Err(self.error());
            }
        }
        match unsafe { (api.step)(statement) } {
            SQLITE_ROW => Ok(true),
            SQLITE_DONE => {
                self.finish(index);
                Ok(false)
            }
            _ => {
                // sqlite3_reset returns the step's error, and the error is then the
                // connection's (the extended code and message).
                unsafe { (api.reset)(statement) };
                let error = self.error();
                self.finish(index);
                Err(error)
            }
        }
    }

    /// Reset statement `index` and drop its bindings (borrowed values).
    fn finish(&self, index: usize) {
        let statement = self.statements[index];
        unsafe {
            (self.api.reset)(statement);
            (self.api.clear_bindings)(statement);
        }
    }

    fn next_row(&self, index: usize) -> SqlResult<bool> {
        match unsafe { (self.api.step)(self.statements[index]) } {
            SQLITE_ROW => Ok(true),
            SQLITE_DONE => Ok(false),
            _ => {
                unsafe { (self.api.reset)(self.statements[index]) };
                Err(self.error())
            }
        }
    }

    fn column_int(&self, index: usize, column: c_int) -> Option<i64> {
        let statement = self.statements[index];
        unsafe {
            match (self.api.column_type)(statement, column) {
                SQLITE_NULL => None,
                _ => Some((self.api.column_int64)(statement, column)),
            }
        }
    }

    fn column_text(&self, index: usize, column: c_int) -> Option<String> {
        let statement = self.statements[index];
        unsafe {
            if (self.api.column_type)(statement, column) == SQLITE_NULL {
                return None;
            }
            let pointer = (self.api.column_text)(statement, column);
            let size = usize::try_from((self.api.column_bytes)(statement, column)).unwrap_or(0);
            if pointer.is_null() {
                return Some(String::new());
            }
            let bytes = std::slice::from_raw_parts(pointer, size);
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
    }

    fn column_blob(&self, index: usize, column: c_int) -> Vec<u8> {
        let statement = self.statements[index];
        unsafe {
            let pointer = (self.api.column_blob)(statement, column);
            let size = usize::try_from((self.api.column_bytes)(statement, column)).unwrap_or(0);
            if pointer.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(pointer.cast::<u8>(), size).to_vec()
            }
        }
    }

    fn changes(&self) -> c_int {
        unsafe { (self.api.changes)(self.db) }
    }

    fn in_transaction(&self) -> bool {
        unsafe { (self.api.get_autocommit)(self.db) == 0 }
    }

    /// End an open transaction after an error; a second failure is not news.
    fn rollback(&self) {
        if self.in_transaction() && self.run(ROLLBACK, &[]).is_err() {
            // The connection rolls back by itself when it cannot go on.
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        unsafe {
            for statement in self.statements.drain(..) {
                (self.api.finalize)(statement);
            }
            (self.api.close_v2)(self.db);
        }
    }
}

fn length(size: usize) -> SqlResult<c_int> {
    c_int::try_from(size).map_err(|_| SqlError {
        code: 18, // SQLITE_TOOBIG
        message: "a value is too big for SQLite".to_string(),
    })
}

// -- the write transaction ----------------------------------------------------------

/// Why the store refused a chain (the Python store turns it into the error).
enum Refusal {
    /// The lease was lost: (the writer's token, the current one or None).
    Lease(i64, Option<i64>),
    /// The execution exists already (a creation).
    Exists,
    /// Another version is stored: (actual version, its snapshot version, the newer
    /// deltas (version, recorded_at_us, actor, data) when few).
    Conflict(i64, i64, Vec<(i64, i64, Option<String>, Vec<u8>)>),
}

impl Refusal {
    fn into_py<'py>(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Refusal::Lease(token, current) => {
                ("lease", token, current).into_pyobject(py)?.into_any()
            }
            Refusal::Exists => ("exists",).into_pyobject(py)?.into_any(),
            Refusal::Conflict(actual, snapshot_version, newer) => {
                let newer: Vec<_> = newer
                    .into_iter()
                    .map(|(version, at, actor, data)| (version, at, actor, PyBytes::new(py, &data)))
                    .collect();
                ("conflict", actual, snapshot_version, newer)
                    .into_pyobject(py)?
                    .into_any()
            }
        })
    }
}

/// A chain to write: its rows, first base version and lease (owned: the writing
/// thread may be another caller's).
struct Planned {
    id: String,
    base_version: i64,
    lease: Option<(String, i64)>,
    rows: crate::batch::SqliteChainRows<'static>,
}

impl Planned {
    fn new(chain: &ChainView<'_>) -> Self {
        Planned {
            id: chain.id.to_string(),
            base_version: i64::try_from(chain.records[0].base_version).unwrap_or(i64::MAX),
            lease: chain.lease.map(|(owner, token)| (owner.to_string(), token)),
            rows: sqlite_chain_rows(chain).into_owned(),
        }
    }

    fn versions(&self) -> u64 {
        self.rows.deltas.len() as u64
    }
}

fn is_busy(error: &SqlError) -> bool {
    matches!(error.code & 0xFF, 5 | 6) // SQLITE_BUSY, SQLITE_LOCKED
}

/// Write `chains` in one transaction (BEGIN IMMEDIATE ... COMMIT); return the
/// refusals by chain index. On an error the transaction is rolled back; while
/// another connection holds the file's lock, the whole transaction is retried
/// until `timeout` has passed (as the Python path's ``_retrying``).
fn write_chains(
    connection: &Connection,
    chains: &[&Planned],
    newer_limit: i64,
    timeout: Duration,
) -> SqlResult<Vec<(usize, Refusal)>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let result = (|| {
            let mut refusals = Vec::new();
            connection.run(BEGIN, &[])?;
            for (index, chain) in chains.iter().enumerate() {
                if let Some(refusal) = write_chain(connection, chain, newer_limit)? {
                    refusals.push((index, refusal));
                }
            }
            connection.run(COMMIT, &[])?;
            Ok(refusals)
        })();
        match result {
            Ok(refusals) => return Ok(refusals),
            Err(error) => {
                connection.rollback();
                let now = Instant::now();
                if !is_busy(&error) || now >= deadline {
                    return Err(error);
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

fn write_chain(
    connection: &Connection,
    chain: &Planned,
    newer_limit: i64,
) -> SqlResult<Option<Refusal>> {
    let id = SqlValue::Text(std::borrow::Cow::Borrowed(chain.id.as_str()));
    if let Some((owner, token)) = &chain.lease {
        let lease = statement_index("select_lease");
        let found = if connection.run(lease, std::slice::from_ref(&id))? {
            let found = (
                connection.column_text(lease, 0),
                connection.column_int(lease, 1),
            );
            connection.finish(lease);
            Some(found)
        } else {
            None
        };
        match found {
            Some((Some(found_owner), Some(found_token)))
                if found_owner == *owner && found_token == *token => {}
            Some((found_owner, found_token)) => {
                let current = if found_owner.is_none() {
                    None
                } else {
                    found_token
                };
                return Ok(Some(Refusal::Lease(*token, current)));
            }
            None => return Ok(Some(Refusal::Lease(*token, None))),
        }
    }
    let rows = &chain.rows;
    let statement = statement_index(match rows.kind {
        RowKind::Insert => "insert_execution",
        RowKind::Update => "update_execution",
        RowKind::UpdateKeepStatus => "update_execution_keep_status",
    });
    connection.run(statement, &rows.row)?;
    if connection.changes() == 0 {
        return Ok(Some(if rows.kind == RowKind::Insert {
            Refusal::Exists
        } else {
            conflict(connection, &id, chain.base_version, newer_limit)?
        }));
    }
    let delta = statement_index("insert_delta");
    for row in &rows.deltas {
        connection.run(delta, row)?;
    }
    let snapshot = statement_index("insert_snapshot");
    for row in &rows.snapshots {
        connection.run(snapshot, row)?;
    }
    Ok(None)
}

/// The refusal of an update based on `base_version` that found another version
/// stored, with the deltas the writer missed when they are few (same transaction).
fn conflict(
    connection: &Connection,
    id: &SqlValue<'_>,
    base_version: i64,
    newer_limit: i64,
) -> SqlResult<Refusal> {
    let select = statement_index("select_version_and_snapshot");
    let (actual, snapshot_version) = if connection.run(select, std::slice::from_ref(id))? {
        let found = (
            connection.column_int(select, 0).unwrap_or(0),
            connection.column_int(select, 1).unwrap_or(0),
        );
        connection.finish(select);
        found
    } else {
        (0, 0)
    };
    let mut newer = Vec::new();
    if 0 < actual - base_version && actual - base_version <= newer_limit {
        let deltas = statement_index("select_newer_deltas");
        let parameters = [
            id.clone(),
            SqlValue::Int(base_version),
            SqlValue::Int(newer_limit),
        ];
        let mut more = connection.run(deltas, &parameters)?;
        while more {
            newer.push((
                connection.column_int(deltas, 0).unwrap_or(0),
                connection.column_int(deltas, 1).unwrap_or(0),
                connection.column_text(deltas, 2),
                connection.column_blob(deltas, 3),
            ));
            more = match connection.next_row(deltas) {
                Ok(more) => more,
                Err(error) => {
                    connection.finish(deltas);
                    return Err(error);
                }
            };
        }
        connection.finish(deltas);
    }
    Ok(Refusal::Conflict(actual, snapshot_version, newer))
}

// -- group commit -------------------------------------------------------------------

/// What one caller's write came to: the refusals by its chain index, or the error
/// of the transaction that carried it.
type Outcome = SqlResult<Vec<(usize, Refusal)>>;

enum Turn {
    /// Queued behind the writer in flight.
    Waiting,
    /// Handed the lead: write (or take an exclusive turn) now.
    Lead,
    /// Written by another caller's transaction.
    Done(Outcome),
}

/// A caller in the queue: chains to write, or none for an exclusive turn (the
/// Python store's own write connection, `begin_exclusive`).
struct Job {
    chains: Vec<Planned>,
    exclusive: bool,
    /// Written in a transaction of its own (a write-behind batch: its failure, or a
    /// value SQLite refuses, must not fail the sync callers it would share with).
    solo: bool,
    turn: Mutex<Turn>,
    wake: Condvar,
}

impl Job {
    fn new(chains: Vec<Planned>, exclusive: bool, solo: bool) -> Arc<Job> {
        Arc::new(Job {
            chains,
            exclusive,
            solo,
            turn: Mutex::new(Turn::Waiting),
            wake: Condvar::new(),
        })
    }

    fn set(&self, turn: Turn) {
        *self.turn.lock() = turn;
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct Group {
    queue: VecDeque<Arc<Job>>,
    /// A caller is writing (or holds an exclusive turn); the others queue.
    busy: bool,
    closed: bool,
    transactions: u64,
    versions: u64,
}

/// The writer was closed.
struct Closed;

// -- the Python class ---------------------------------------------------------------

/// The SQLite store's native writer (see the module docs): one connection, and the
/// group commit of the callers of every thread.
///
/// Whoever finds nobody writing leads: it writes its own chains and those of every
/// caller queued meanwhile (up to `max_batch` versions) in one transaction, one
/// disk flush, then hands the lead to the first caller queued since. Callers wait
/// without the GIL.
#[pyclass(frozen, module = "wfstate._core", name = "SqliteWriter")]
pub struct PySqliteWriter {
    group: Mutex<Group>,
    idle: Condvar,
    connection: Mutex<Option<Connection>>,
    max_batch: u64,
    newer_limit: i64,
    timeout: Duration,
}

impl PySqliteWriter {
    /// Queue `job` (or lead at once when nobody writes); return once it is written
    /// (its outcome) or, for an exclusive turn, once the turn is the caller's.
    fn enqueue(&self, job: &Arc<Job>) -> Result<Option<Outcome>, Closed> {
        {
            let mut group = self.group.lock();
            if group.closed {
                return Err(Closed);
            }
            if !group.busy {
                group.busy = true;
                return Ok(None);
            }
            group.queue.push_back(job.clone());
        }
        let mut turn = job.turn.lock();
        loop {
            match std::mem::replace(&mut *turn, Turn::Waiting) {
                Turn::Waiting => job.wake.wait(&mut turn),
                Turn::Lead => return Ok(None),
                Turn::Done(outcome) => return Ok(Some(outcome)),
            }
        }
    }

    /// Write `job` and the write jobs queued behind it in one transaction; hand on
    /// the lead; return `job`'s outcome.
    fn lead(&self, job: &Arc<Job>) -> Outcome {
        let mut batch = vec![job.clone()];
        {
            let mut group = self.group.lock();
            let mut versions: u64 = job.chains.iter().map(Planned::versions).sum();
            while let Some(next) = group.queue.front() {
                let size: u64 = next.chains.iter().map(Planned::versions).sum();
                if job.solo || next.solo || next.exclusive || versions + size > self.max_batch {
                    break;
                }
                versions += size;
                batch.push(group.queue.pop_front().expect("a front"));
            }
            if !job.solo {
                group.transactions += 1;
                group.versions += versions;
            }
        }
        let chains: Vec<&Planned> = batch.iter().flat_map(|j| &j.chains).collect();
        let outcome = match self.connection.lock().as_ref() {
            // A panic must not leave the group without a leader (every later caller
            // would wait forever): it becomes the batch's error.
            Some(connection) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_chains(connection, &chains, self.newer_limit, self.timeout)
            }))
            .unwrap_or_else(|_| {
                connection.rollback();
                Err(SqlError {
                    code: 2, // SQLITE_INTERNAL
                    message: "the native SQLite writer panicked; nothing was written".to_string(),
                })
            }),
            None => Err(SqlError {
                code: 21, // SQLITE_MISUSE
                message: "the native SQLite writer is closed".to_string(),
            }),
        };
        let mut mine = None;
        match outcome {
            Ok(refusals) => {
                let mut refusals = refusals.into_iter().peekable();
                let mut first = 0;
                for (index, one) in batch.iter().enumerate() {
                    let end = first + one.chains.len();
                    let mut own = Vec::new();
                    while let Some((chain, _)) = refusals.peek() {
                        if *chain >= end {
                            break;
                        }
                        let (chain, refusal) = refusals.next().expect("peeked");
                        own.push((chain - first, refusal));
                    }
                    first = end;
                    if index == 0 {
                        mine = Some(Ok(own));
                    } else {
                        one.set(Turn::Done(Ok(own)));
                    }
                }
            }
            Err(error) => {
                for one in &batch[1..] {
                    one.set(Turn::Done(Err(error.clone())));
                }
                mine = Some(Err(error));
            }
        }
        self.hand_on();
        mine.expect("the leader's own outcome")
    }

    /// Hand the lead to the first queued caller, or become idle.
    fn hand_on(&self) {
        let mut group = self.group.lock();
        match group.queue.pop_front() {
            Some(next) => next.set(Turn::Lead),
            None => {
                group.busy = false;
                self.idle.notify_all();
            }
        }
    }

    /// Write a write-behind batch in a transaction of its own, with a snapshot at the
    /// last version of each flagged chain. Called without the GIL. Returns the
    /// outcome, the snapshot sizes per chain and the chains' execution ids.
    fn write_record_batch(
        &self,
        batch: &PyRecordBatch,
        flags: &[bool],
    ) -> (Result<Outcome, Closed>, Vec<usize>, Vec<String>) {
        let snapshots = batch.encode_snapshots(flags);
        let planned: Vec<Planned> = batch.views(&snapshots).iter().map(Planned::new).collect();
        let ids = planned.iter().map(|chain| chain.id.clone()).collect();
        let sizes = PyRecordBatch::snapshot_sizes(&snapshots);
        (self.commit(planned, true), sizes, ids)
    }

    /// Write `chains` with the group and return the refusals by chain index. Called
    /// without the GIL.
    fn commit(&self, chains: Vec<Planned>, solo: bool) -> Result<Outcome, Closed> {
        let job = Job::new(chains, false, solo);
        match self.enqueue(&job)? {
            Some(outcome) => Ok(outcome),
            None => Ok(self.lead(&job)),
        }
    }
}

/// A write-behind batch's write: stored whole when committed with no refusal.
impl Written for (Result<Outcome, Closed>, Vec<usize>, Vec<String>) {
    fn stored_whole(&self) -> Option<&[usize]> {
        matches!(&self.0, Ok(Ok(refusals)) if refusals.is_empty()).then_some(&self.1[..])
    }
}

/// A commit's result as Python sees it: the refusals, or the `sqlite3` module's
/// error, or `RuntimeError` once closed.
fn outcome_to_py(
    py: Python<'_>,
    outcome: Result<Outcome, Closed>,
) -> PyResult<Vec<(usize, Refusal)>> {
    match outcome {
        Err(Closed) => Err(closed_error()),
        Ok(outcome) => outcome.map_err(|error| error.into_py(py)),
    }
}

/// The longest lock timeout honoured, in seconds (a day).
const MAX_TIMEOUT_S: f64 = 86_400.0;

/// Refusals by chain index as Python takes them: by execution id (`ids`, per chain).
#[allow(clippy::type_complexity)]
fn refusals_by_id<'py>(
    py: Python<'py>,
    refusals: Vec<(usize, Refusal)>,
    ids: &[String],
) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
    refusals
        .into_iter()
        .map(|(index, refusal)| Ok((ids[index].clone(), refusal.into_py(py)?)))
        .collect()
}

fn closed_error() -> PyErr {
    PyRuntimeError::new_err("the native SQLite writer is closed")
}

#[pymethods]
impl PySqliteWriter {
    /// Open a write connection to the database at `path` (which must exist: the
    /// Python store creates and migrates it), with SQLite's busy timeout (also how
    /// long a transaction is retried while another connection holds the lock),
    /// running `pragmas` and preparing `statements` (by name: see `STATEMENTS`).
    /// A transaction carries at most `max_batch` versions (more when one caller's
    /// write alone is larger); a conflict carries at most `newer_limit` newer deltas.
    ///
    /// The C API comes from `module_path`, the `sqlite3` module's extension
    /// (`_sqlite3.__file__`), as it resolves it. Raises `ValueError` when that
    /// cannot be used (not a shared library, SQLite linked into it without exported
    /// functions, a library without thread support, another version than
    /// `expected_version`), and the `sqlite3` module's errors when opening fails.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (path, statements, pragmas, timeout, module_path, expected_version, *, max_batch = 1000, newer_limit = 64))]
    fn new(
        py: Python<'_>,
        path: &str,
        statements: HashMap<String, String>,
        pragmas: Vec<String>,
        timeout: f64,
        module_path: &str,
        expected_version: &str,
        max_batch: u64,
        newer_limit: i64,
    ) -> PyResult<Self> {
        let api = api(module_path).map_err(PyValueError::new_err)?;
        let version = unsafe { CStr::from_ptr((api.libversion)()) }.to_string_lossy();
        if version != expected_version {
            return Err(PyValueError::new_err(format!(
                "the loaded SQLite library is version {version}, the sqlite3 module's \
                 {expected_version}: not the same copy"
            )));
        }
        if !(timeout.is_finite() && timeout >= 0.0) || max_batch == 0 || newer_limit < 0 {
            return Err(PyValueError::new_err(
                "timeout must be finite and >= 0, max_batch > 0, newer_limit >= 0",
            ));
        }
        // Longer than a day is forever: clamped, so that no deadline can overflow.
        let timeout = Duration::from_secs_f64(timeout.min(MAX_TIMEOUT_S));
        let busy_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        let connection = py
            .detach(|| Connection::open(api, path, &statements, &pragmas, busy_ms))
            .map_err(|error| error.into_py(py))?;
        Ok(PySqliteWriter {
            group: Mutex::new(Group::default()),
            idle: Condvar::new(),
            connection: Mutex::new(Some(connection)),
            max_batch,
            newer_limit,
            timeout,
        })
    }

    /// Write the sync path's items, group-committed with every other thread's, and
    /// return the refused chains: `(positions of their items, refusal)`, a refusal
    /// being `("lease", token, current token or None)`, `("exists",)` or
    /// `("conflict", stored version, its snapshot version, [(version,
    /// recorded_at_us, actor, delta)] when few versions newer)`. Raises the
    /// `sqlite3` module's error when the transaction carrying them failed (nothing
    /// of it is stored) and `RuntimeError` once closed.
    #[allow(clippy::type_complexity)]
    fn write_items<'py>(
        &self,
        py: Python<'py>,
        items: Vec<SyncItem<'py>>,
    ) -> PyResult<Vec<(Vec<usize>, Bound<'py, PyAny>)>> {
        let chains = crate::batch::item_chains(&items);
        let planned = chains
            .iter()
            .map(|(chain, _)| Planned::new(chain))
            .collect();
        let outcome = py.detach(|| self.commit(planned, false));
        outcome_to_py(py, outcome)?
            .into_iter()
            .map(|(index, refusal)| Ok((chains[index].1.clone(), refusal.into_py(py)?)))
            .collect()
    }

    /// The sync path of one update without a lease, in one call (the manager's hot
    /// path on SQLite): prepare it on `core` as `Core.prepare` does, decide its
    /// snapshot with `tracker` as `snapshot_for` does (taken back with `undo` when
    /// the write fails or is refused), write it with the group as `write_items`
    /// does, and publish it on `core` once it is stored. The snapshot
    /// and the write run without the GIL. If memory moved on meanwhile (another
    /// thread reloaded the execution), memory is brought to the stored version
    /// instead, when it is behind it.
    ///
    /// Returns `(new version, None)`, or `(base version, refusal)` when the store
    /// refused it (a refusal as `write_items` gives them; nothing is published).
    /// Raises what `Core.prepare` raises (nothing written), the `sqlite3` module's
    /// error when the transaction failed (nothing stored, nothing published), and
    /// `RuntimeError` once closed. The preparation reserves the version's ring room
    /// (`BackpressureError` then, before anything is written, when there is none);
    /// `ClosedError` after the write leaves the version stored and not published,
    /// as a `write_items` followed by `Core.publish` would.
    #[pyo3(signature = (core, tracker, execution_id, update, expected_version = None, actor = None))]
    #[allow(clippy::too_many_arguments)]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        core: PyRef<'py, PyCore>,
        tracker: PyRef<'py, PySnapshotTracker>,
        execution_id: &Bound<'py, PyAny>,
        update: &Bound<'py, PyAny>,
        expected_version: Option<&Bound<'py, PyAny>>,
        actor: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(u64, Option<Bound<'py, PyAny>>)> {
        let prepared = core.prepared(py, execution_id, update, expected_version, actor)?;
        let record = version_record(&prepared);
        let tracker: &PySnapshotTracker = &tracker;
        let outcome = py.detach(|| {
            let snapshot = tracker.snapshot_of(&record);
            let chain = ChainView {
                id: &record.state.execution_id,
                records: vec![&record],
                snapshots: vec![snapshot.as_deref()],
                lease: None,
            };
            self.commit(vec![Planned::new(&chain)], false)
        });
        let undo = || {
            tracker
                .tracker()
                .undo(&record.state.execution_id, record.state.version)
        };
        let refusals = outcome_to_py(py, outcome).inspect_err(|_| undo())?;
        match refusals.into_iter().next() {
            None => {
                core.publish_stored(py, &prepared)?;
                Ok((prepared.state.version, None))
            }
            Some((_, refusal)) => {
                undo();
                Ok((prepared.base_version, Some(refusal.into_py(py)?)))
            }
        }
    }

    /// Write a write-behind batch (through the group's queue, in a transaction of its
    /// own), with a snapshot at the last version of each chain whose flag is set (one
    /// per chain, in `chains()` order).
    /// Returns the refusals by execution id (as `write_items` gives them) and the
    /// snapshot sizes per chain (0: none).
    #[allow(clippy::type_complexity)]
    fn write_batch<'py>(
        &self,
        py: Python<'py>,
        batch: PyRef<'py, PyRecordBatch>,
        snapshot: Vec<bool>,
    ) -> PyResult<(Vec<(String, Bound<'py, PyAny>)>, Vec<usize>)> {
        batch.check_flags(&snapshot)?;
        let batch: &PyRecordBatch = &batch;
        // One release of the GIL for the whole batch: while other threads run
        // Python, taking the GIL back can wait a switch interval (5 ms) each time.
        let (outcome, sizes, ids) = py.detach(|| self.write_record_batch(batch, &snapshot));
        let refusals = refusals_by_id(py, outcome_to_py(py, outcome)?, &ids)?;
        Ok((refusals, sizes))
    }

    /// Wait (without the GIL) for a turn of its own in the queue, as if writing; call
    /// `operation()` in it; return its result. No transaction of this writer runs
    /// meanwhile. For writes on another connection of the same process (the store's
    /// leases), which would otherwise wait on the file's lock. The turn is handed
    /// on however `operation` ends (a signal handler's exception, raised once the
    /// wait is over, included).
    fn exclusive(&self, py: Python<'_>, operation: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        struct HandOn<'a>(&'a PySqliteWriter);
        impl Drop for HandOn<'_> {
            fn drop(&mut self) {
                self.0.hand_on();
            }
        }
        let job = Job::new(Vec::new(), true, true);
        py.detach(|| self.enqueue(&job))
            .map_err(|Closed| closed_error())?;
        let _turn = HandOn(self);
        operation.call0().map(Bound::unbind)
    }

    /// The write-behind's step in one release of the GIL: read the next batch from
    /// the durable `cursor` (up to `max_events` events, waiting up to `timeout`
    /// seconds for the first; `skip_before` as `EventCursor.read_batch` takes it),
    /// decide its snapshots with `tracker` (`decide_chain` per chain), and write it
    /// as `write_batch` does.
    ///
    /// While the reads come full (they stopped at `max_events` events) and their
    /// batches are stored whole, it goes on for up to `keep_going` seconds after
    /// the first read, still without the GIL: each such batch's snapshot sizes go to
    /// `tracker` (`snapshotted`), it is taken off the ring (`cursor.commit()`), and
    /// it is counted in `earlier`; the next read does not wait. The last batch is
    /// returned as a single step's: `(batch, batch.chains(), snapshot flags,
    /// refusals by execution id or None, snapshot sizes or None, error or None,
    /// earlier)`, with `earlier` = `(batches, versions, dropped)` of the reads
    /// stored before it. Nothing written for an empty batch; on a failed write, the
    /// `sqlite3` module's error (or `RuntimeError` once closed) and the batch and
    /// flags to retry with `write_batch`. The cursor is not committed for the last
    /// batch. A cursor closed after some batches were stored ends the step with an
    /// empty batch (or the batch just stored) instead of an error.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    #[pyo3(signature = (cursor, tracker, max_events, timeout, skip_before = None, keep_going = 0.0))]
    fn pump<'py>(
        &self,
        py: Python<'py>,
        cursor: PyRef<'py, PyEventCursor>,
        tracker: PyRef<'py, PySnapshotTracker>,
        max_events: usize,
        timeout: f64,
        skip_before: Option<HashMap<String, u64>>,
        keep_going: f64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let id = cursor.open_id()?;
        let first_deadline = deadline_after(timeout, "timeout")?;
        // Checked here; the window opens once the first batch is read.
        deadline_after(keep_going, "keep_going")?;
        let window = Duration::from_secs_f64(keep_going);
        let source = Source {
            cursor: &cursor,
            id,
            tracker: tracker.tracker(),
            max_events,
            first_deadline,
            keep_going: window,
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
                self.write_record_batch(batch, flags)
            })
        })?;
        let none = || py.None().into_bound(py);
        let (refusals, sizes, error) = match written {
            None => (none(), none(), none()),
            Some((Ok(Ok(refusals)), sizes, ids)) => {
                let refusals = refusals_by_id(py, refusals, &ids)?;
                (
                    refusals.into_pyobject(py)?.into_any(),
                    sizes.into_pyobject(py)?.into_any(),
                    none(),
                )
            }
            Some((Ok(Err(error)), _, _)) => (
                none(),
                none(),
                error.into_py(py).into_value(py).into_bound(py).into_any(),
            ),
            Some((Err(Closed), _, _)) => (
                none(),
                none(),
                closed_error().into_value(py).into_bound(py).into_any(),
            ),
        };
        PyTuple::new(
            py,
            [
                Bound::new(py, batch)?.into_any(),
                chains.into_pyobject(py)?.into_any(),
                flags.into_pyobject(py)?.into_any(),
                refusals,
                sizes,
                error,
                earlier.into_pyobject(py)?.into_any(),
            ],
        )
    }

    /// `(transactions of sync writes (`write_items`), versions they carried)`;
    /// write-behind batches are not counted (the flusher counts them).
    fn stats(&self) -> (u64, u64) {
        let group = self.group.lock();
        (group.transactions, group.versions)
    }

    /// Close the connection once the writes in flight and queued are done
    /// (idempotent); later writes raise `RuntimeError`.
    fn close(&self, py: Python<'_>) {
        let connection = py.detach(|| {
            let mut group = self.group.lock();
            group.closed = true;
            while group.busy {
                self.idle.wait(&mut group);
            }
            self.connection.lock().take()
        });
        drop(connection);
    }

    /// Whether `close()` was called (writes are refused from then on).
    #[getter]
    fn closed(&self) -> bool {
        self.group.lock().closed
    }
}
