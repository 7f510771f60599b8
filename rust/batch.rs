//! Write-behind batches: the versions a durable cursor read, encoded for a store in
//! one call.
//!
//! The async flusher used to turn every version into Python objects and build the
//! store's parameters in Python, about 15 µs of GIL time per version. A
//! `RecordBatch` keeps the versions in Rust, groups them into per-execution chains,
//! and encodes what a store needs for the whole batch at once, without the GIL:
//! PostgreSQL's binary arrays (the parameters of the store's `unnest` statement) or
//! SQLite's rows. Python decides the snapshots (one decision per chain) and sends.
//!
//! Must never reorder an execution's versions, and must encode exactly what the
//! per-version path (`VersionRecord` + the stores' Python) encodes: the tests compare
//! the two.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::codec;
use crate::model::EventKind;
use crate::py::PyVersionRecord;

/// The bit of each event type in a delta's `event_mask` (stable: stored on disk;
/// the same order as `wfstate.store.base.EVENT_TYPE_BITS`).
pub fn event_bit(kind: EventKind) -> u32 {
    let position = match kind {
        EventKind::ExecutionCreated => 0,
        EventKind::StatusChange => 1,
        EventKind::NodePending => 2,
        EventKind::NodeStart => 3,
        EventKind::NodeComplete => 4,
        EventKind::NodeFailed => 5,
        EventKind::NodeSkipped => 6,
        EventKind::NodeMetrics => 7,
        EventKind::Error => 8,
        EventKind::CurrentNodeChanged => 9,
        EventKind::VariablesChanged => 10,
        EventKind::ContextChanged => 11,
        EventKind::ExecutionForked => 12,
    };
    1 << position
}

/// A value of a SQLite statement parameter, borrowed from the versions it encodes:
/// the native writer binds these, and the Python path gets them as tuples.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlValue<'a> {
    Null,
    Int(i64),
    Text(std::borrow::Cow<'a, str>),
    Blob(std::borrow::Cow<'a, [u8]>),
}

impl<'a> SqlValue<'a> {
    fn text(value: &'a str) -> Self {
        SqlValue::Text(std::borrow::Cow::Borrowed(value))
    }

    fn opt_text(value: Option<&'a str>) -> Self {
        value.map_or(SqlValue::Null, SqlValue::text)
    }

    fn opt_int(value: Option<i64>) -> Self {
        value.map_or(SqlValue::Null, SqlValue::Int)
    }

    /// The same value, owning what it borrowed.
    pub(crate) fn into_owned(self) -> SqlValue<'static> {
        match self {
            SqlValue::Null => SqlValue::Null,
            SqlValue::Int(n) => SqlValue::Int(n),
            SqlValue::Text(text) => SqlValue::Text(std::borrow::Cow::Owned(text.into_owned())),
            SqlValue::Blob(bytes) => SqlValue::Blob(std::borrow::Cow::Owned(bytes.into_owned())),
        }
    }
}

/// Which statement a chain's executions row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowKind {
    /// A creation: the INSERT (9 values).
    Insert,
    /// The UPDATE with the status (6 values).
    Update,
    /// The UPDATE without the status (5 values): no version of the chain changed it.
    UpdateKeepStatus,
}

/// One chain's SQLite parameters (see `sqlite_chain_rows`).
pub(crate) struct SqliteChainRows<'a> {
    pub kind: RowKind,
    pub row: Vec<SqlValue<'a>>,
    pub deltas: Vec<Vec<SqlValue<'a>>>,
    pub snapshots: Vec<Vec<SqlValue<'a>>>,
}

impl SqliteChainRows<'_> {
    /// The same rows, owning what they borrowed (to cross to another thread).
    pub(crate) fn into_owned(self) -> SqliteChainRows<'static> {
        let owned = |rows: Vec<Vec<SqlValue<'_>>>| {
            rows.into_iter()
                .map(|row| row.into_iter().map(SqlValue::into_owned).collect())
                .collect()
        };
        SqliteChainRows {
            kind: self.kind,
            row: self.row.into_iter().map(SqlValue::into_owned).collect(),
            deltas: owned(self.deltas),
            snapshots: owned(self.snapshots),
        }
    }
}

/// One chain's SQLite parameters: the executions row (INSERT parameters for a
/// creation, else the UPDATE's: last version, status (only when a version of the
/// chain changed it) and time, the newest snapshot's version or 0 to keep the stored
/// one, id, first base), the `wfstate_deltas` rows (`execution_id, version,
/// recorded_at_us, actor, event_mask, node_ids (JSON), data, lease_owner,
/// lease_token`) and the snapshot rows (`execution_id, version, data`).
pub(crate) fn sqlite_chain_rows<'a>(chain: &ChainView<'a>) -> SqliteChainRows<'a> {
    let id = chain.id;
    let first = chain.records[0];
    let last = chain.records[chain.records.len() - 1];
    let mut deltas = Vec::with_capacity(chain.records.len());
    let mut snapshots = Vec::new();
    let mut snapshot_version = 0;
    for (record, snapshot) in chain.records.iter().zip(&chain.snapshots) {
        let node_ids: Vec<&str> = record.node_ids.iter().map(|n| &**n).collect();
        let node_ids = serde_json::to_string(&node_ids).expect("strings serialize");
        deltas.push(vec![
            SqlValue::text(id),
            SqlValue::Int(int(record.state.version)),
            SqlValue::Int(record.state.updated_at),
            SqlValue::opt_text(record.actor.as_deref()),
            SqlValue::Int(event_mask(&record.event_types).into()),
            SqlValue::Text(std::borrow::Cow::Owned(node_ids)),
            SqlValue::Blob(std::borrow::Cow::Borrowed(&record.delta)),
            SqlValue::opt_text(chain.lease.map(|(owner, _)| owner)),
            SqlValue::opt_int(chain.lease.map(|(_, token)| token)),
        ]);
        if let Some(bytes) = snapshot {
            snapshot_version = int(record.state.version);
            snapshots.push(vec![
                SqlValue::text(id),
                SqlValue::Int(snapshot_version),
                SqlValue::Blob(std::borrow::Cow::Borrowed(bytes)),
            ]);
        }
    }
    let (kind, row) = if first.base_version == 0 {
        let (forked_id, forked_version) = match &first.state.forked_from {
            Some((fid, fv)) => (SqlValue::text(fid), SqlValue::Int(int(*fv))),
            None => (SqlValue::Null, SqlValue::Null),
        };
        let row = vec![
            SqlValue::text(id),
            SqlValue::text(&first.state.workflow_id),
            SqlValue::text(last.state.status.as_str()),
            SqlValue::Int(int(last.state.version)),
            SqlValue::Int(first.state.created_at),
            SqlValue::Int(last.state.updated_at),
            SqlValue::Int(snapshot_version),
            forked_id,
            forked_version,
        ];
        (RowKind::Insert, row)
    } else if chain
        .records
        .iter()
        .any(|r| r.event_types.contains(&EventKind::StatusChange))
    {
        let row = vec![
            SqlValue::Int(int(last.state.version)),
            SqlValue::text(last.state.status.as_str()),
            SqlValue::Int(last.state.updated_at),
            SqlValue::Int(snapshot_version),
            SqlValue::text(id),
            SqlValue::Int(int(first.base_version)),
        ];
        (RowKind::Update, row)
    } else {
        // The status is the stored one: leaving it out of the UPDATE spares SQLite
        // the rewrite of its index entry (SQLite updates every index on a column
        // the SET names, changed or not).
        let row = vec![
            SqlValue::Int(int(last.state.version)),
            SqlValue::Int(last.state.updated_at),
            SqlValue::Int(snapshot_version),
            SqlValue::text(id),
            SqlValue::Int(int(first.base_version)),
        ];
        (RowKind::UpdateKeepStatus, row)
    };
    SqliteChainRows {
        kind,
        row,
        deltas,
        snapshots,
    }
}

/// Parameters as the Python sqlite3 module takes them: a tuple.
fn sql_tuple<'py>(py: Python<'py>, values: &[SqlValue<'_>]) -> PyResult<Bound<'py, PyAny>> {
    let items: Vec<Bound<'py, PyAny>> = values
        .iter()
        .map(|value| match value {
            SqlValue::Null => Ok(py.None().into_bound(py)),
            SqlValue::Int(n) => Ok(n.into_pyobject(py)?.into_any()),
            SqlValue::Text(text) => Ok(text.as_ref().into_pyobject(py)?.into_any()),
            SqlValue::Blob(bytes) => Ok(PyBytes::new(py, bytes).into_any()),
        })
        .collect::<PyResult<_>>()?;
    Ok(pyo3::types::PyTuple::new(py, items)?.into_any())
}

/// `sqlite_chain_rows` as the Python path takes them: `(executions row, delta rows,
/// snapshot rows)`, each row a tuple.
#[allow(clippy::type_complexity)]
pub(crate) fn sqlite_chain<'py>(
    py: Python<'py>,
    chain: &ChainView<'_>,
) -> PyResult<(
    Bound<'py, PyAny>,
    Vec<Bound<'py, PyAny>>,
    Vec<Bound<'py, PyAny>>,
)> {
    let rows = sqlite_chain_rows(chain);
    let deltas = rows
        .deltas
        .iter()
        .map(|row| sql_tuple(py, row))
        .collect::<PyResult<_>>()?;
    let snapshots = rows
        .snapshots
        .iter()
        .map(|row| sql_tuple(py, row))
        .collect::<PyResult<_>>()?;
    Ok((sql_tuple(py, &rows.row)?, deltas, snapshots))
}

pub fn event_mask(kinds: &[EventKind]) -> u32 {
    kinds.iter().fold(0, |mask, kind| mask | event_bit(*kind))
}

const TEXT_OID: i32 = 25;
const INT8_OID: i32 = 20;
const BYTEA_OID: i32 = 17;

/// A one-dimensional array in PostgreSQL's binary format (what `array_recv` reads).
pub struct PgArray {
    oid: i32,
    count: i32,
    has_null: bool,
    elements: Vec<u8>,
}

impl PgArray {
    pub fn new(oid: i32) -> Self {
        PgArray {
            oid,
            count: 0,
            has_null: false,
            elements: Vec::new(),
        }
    }

    pub fn push(&mut self, value: Option<&[u8]>) {
        self.count += 1;
        match value {
            None => {
                self.has_null = true;
                self.elements.extend_from_slice(&(-1i32).to_be_bytes());
            }
            Some(bytes) => {
                let length = i32::try_from(bytes.len()).expect("an element over 2 GB");
                self.elements.extend_from_slice(&length.to_be_bytes());
                self.elements.extend_from_slice(bytes);
            }
        }
    }

    pub fn push_int(&mut self, value: Option<i64>) {
        match value {
            None => self.push(None),
            Some(value) => self.push(Some(&value.to_be_bytes())),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.elements.len());
        if self.count == 0 {
            out.extend_from_slice(&0i32.to_be_bytes());
            out.extend_from_slice(&0i32.to_be_bytes());
            out.extend_from_slice(&self.oid.to_be_bytes());
            return out;
        }
        out.extend_from_slice(&1i32.to_be_bytes());
        out.extend_from_slice(&i32::from(self.has_null).to_be_bytes());
        out.extend_from_slice(&self.oid.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
        out.extend_from_slice(&self.elements);
        out
    }
}

/// A node-id list as a PostgreSQL array literal (every element double-quoted, with
/// backslash and double quote escaped): each row of the `d_nodes` array and the
/// one-version write's `nodes` parameter, cast back with `::text[]`.
pub fn text_array_literal(values: &[Arc<str>]) -> String {
    if values.is_empty() {
        return "{}".to_string();
    }
    let mut out = String::from("{");
    for (position, value) in values.iter().enumerate() {
        if position > 0 {
            out.push(',');
        }
        out.push('"');
        for c in value.chars() {
            if c == '\\' || c == '"' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The positions of `ids` grouped by id, the groups in first-seen order (a batch's
/// versions of one execution come in version order, so each group is a chain).
fn group_positions<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<(&'a str, Vec<usize>)> {
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (position, id) in ids.enumerate() {
        let group = *by_id.entry(id).or_insert_with(|| {
            groups.push((id, Vec::new()));
            groups.len() - 1
        });
        groups[group].1.push(position);
    }
    groups
}

/// One execution's versions in a batch, in version order.
struct Chain {
    execution_id: Arc<str>,
    records: Vec<usize>,
}

/// The versions a durable cursor read in one `read_batch`, grouped by execution.
#[pyclass(frozen, module = "wfstate._core", name = "RecordBatch")]
pub struct PyRecordBatch {
    records: Vec<PyVersionRecord>,
    chains: Vec<Chain>,
    dropped: usize,
}

impl PyRecordBatch {
    /// How many executions the batch holds versions of.
    pub(crate) fn chain_count(&self) -> usize {
        self.chains.len()
    }

    /// Versions left out (`skip_before`).
    pub(crate) fn dropped_count(&self) -> usize {
        self.dropped
    }

    pub fn new(records: Vec<PyVersionRecord>, dropped: usize) -> Self {
        let chains = group_positions(records.iter().map(|r| &*r.state.execution_id))
            .into_iter()
            .map(|(_, positions)| Chain {
                execution_id: records[positions[0]].state.execution_id.clone(),
                records: positions,
            })
            .collect();
        PyRecordBatch {
            records,
            chains,
            dropped,
        }
    }

    fn first(&self, chain: &Chain) -> &PyVersionRecord {
        &self.records[chain.records[0]]
    }

    fn last(&self, chain: &Chain) -> &PyVersionRecord {
        &self.records[*chain.records.last().expect("a chain is never empty")]
    }

    /// A chain as the encoders take it: its snapshot (when due) at its last version.
    fn view<'a>(&'a self, chain: &'a Chain, snapshot: Option<&'a [u8]>) -> ChainView<'a> {
        let records: Vec<&PyVersionRecord> =
            chain.records.iter().map(|p| &self.records[*p]).collect();
        let mut snapshots = vec![None; records.len()];
        if let Some(last) = snapshots.last_mut() {
            *last = snapshot;
        }
        ChainView {
            id: &chain.execution_id,
            records,
            snapshots,
            lease: None,
        }
    }

    /// Every chain as the encoders take it, in `chains()` order, with `snapshots`
    /// (one per chain: see `snapshots`).
    pub(crate) fn views<'a>(&'a self, snapshots: &'a [Option<Vec<u8>>]) -> Vec<ChainView<'a>> {
        self.chains
            .iter()
            .zip(snapshots)
            .map(|(chain, snapshot)| self.view(chain, snapshot.as_deref()))
            .collect()
    }

    /// Chain indices in execution-id order: concurrent batches then lock and insert
    /// rows in one order and cannot deadlock.
    fn sorted_chains(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.chains.len()).collect();
        order.sort_by(|a, b| {
            self.chains[*a]
                .execution_id
                .cmp(&self.chains[*b].execution_id)
        });
        order
    }

    pub(crate) fn check_flags(&self, snapshot: &[bool]) -> PyResult<()> {
        if snapshot.len() == self.chains.len() {
            Ok(())
        } else {
            Err(crate::errors::CoreError::Validation(format!(
                "one snapshot flag per chain: {} chains, {} flags",
                self.chains.len(),
                snapshot.len()
            ))
            .into())
        }
    }

    /// The snapshots wanted, encoded (without the GIL): per chain, None or the bytes
    /// of its last state.
    pub(crate) fn snapshots(&self, py: Python<'_>, snapshot: &[bool]) -> Vec<Option<Vec<u8>>> {
        py.detach(|| self.encode_snapshots(snapshot))
    }

    /// The size of each chain's snapshot in `snapshots` (0: none).
    pub(crate) fn snapshot_sizes(snapshots: &[Option<Vec<u8>>]) -> Vec<usize> {
        snapshots
            .iter()
            .map(|s| s.as_ref().map_or(0, Vec::len))
            .collect()
    }

    /// `snapshots`, for a caller that has let go of the GIL already.
    pub(crate) fn encode_snapshots(&self, snapshot: &[bool]) -> Vec<Option<Vec<u8>>> {
        self.chains
            .iter()
            .zip(snapshot)
            .map(|(chain, wanted)| wanted.then(|| codec::encode_snapshot(&self.last(chain).state)))
            .collect()
    }
}

#[pymethods]
impl PyRecordBatch {
    pub(crate) fn __len__(&self) -> usize {
        self.records.len()
    }

    /// Versions left out because they belong to a lineage the store refused.
    #[getter]
    fn dropped(&self) -> usize {
        self.dropped
    }

    /// The versions, as `VersionRecord`s (the per-version path).
    fn records(&self) -> Vec<PyVersionRecord> {
        self.records.clone()
    }

    /// Per execution, in first-appearance order: `(execution_id, first base version,
    /// last version, last status, total delta bytes, the first version's delta
    /// bytes, versions)`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn chains(&self) -> Vec<(String, u64, u64, &'static str, usize, usize, usize)> {
        self.chains
            .iter()
            .map(|chain| {
                let first = self.first(chain);
                let last = self.last(chain);
                let bytes = chain
                    .records
                    .iter()
                    .map(|r| self.records[*r].delta.len())
                    .sum();
                (
                    chain.execution_id.to_string(),
                    first.base_version,
                    last.state.version,
                    last.state.status.as_str(),
                    bytes,
                    first.delta.len(),
                    chain.records.len(),
                )
            })
            .collect()
    }

    /// The parameters of the PostgreSQL store's batch statement, as binary arrays:
    /// `(parameters, snapshot sizes per chain (0: none), has updates, has creations)`.
    /// `snapshot` holds one flag per chain (in `chains()` order).
    #[allow(clippy::type_complexity)]
    fn pg_parameters<'py>(
        &self,
        py: Python<'py>,
        snapshot: Vec<bool>,
    ) -> PyResult<(Bound<'py, PyDict>, Vec<usize>, bool, bool)> {
        self.check_flags(&snapshot)?;
        let snapshots = self.snapshots(py, &snapshot);
        let arrays = py.detach(|| self.encode_pg(&snapshots));
        let (parameters, has_updates, has_creations) = pg_parameter_dict(py, arrays)?;
        let sizes = Self::snapshot_sizes(&snapshots);
        Ok((parameters, sizes, has_updates, has_creations))
    }

    /// The deltas of the chains not named in `exclude`, as a binary COPY payload (see
    /// the PostgreSQL store's `write_batch`).
    #[pyo3(signature = (exclude = None))]
    fn pg_copy<'py>(
        &self,
        py: Python<'py>,
        exclude: Option<std::collections::HashSet<String>>,
    ) -> Bound<'py, PyBytes> {
        let exclude = exclude.unwrap_or_default();
        let payload = py.detach(|| self.encode_copy(&exclude));
        PyBytes::new(py, &payload)
    }

    /// The SQLite store's rows, per chain in `chains()` order: `(execution_id, base
    /// version, executions row (INSERT parameters for a creation, else UPDATE ones:
    /// 6 values, or 5 without the status when no version changed it; see
    /// `sqlite_chain`), delta rows, snapshot rows)`, and the snapshot sizes.
    #[allow(clippy::type_complexity)]
    fn sqlite_rows<'py>(
        &self,
        py: Python<'py>,
        snapshot: Vec<bool>,
    ) -> PyResult<(Vec<Bound<'py, PyAny>>, Vec<usize>)> {
        self.check_flags(&snapshot)?;
        let snapshots = self.snapshots(py, &snapshot);
        let mut chains = Vec::with_capacity(self.chains.len());
        for view in self.views(&snapshots) {
            let (row, deltas, snapshots) = sqlite_chain(py, &view)?;
            let (id, base) = (view.id, view.records[0].base_version);
            chains.push(
                (id, base, row, deltas, snapshots)
                    .into_pyobject(py)?
                    .into_any(),
            );
        }
        Ok((chains, Self::snapshot_sizes(&snapshots)))
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A `COPY ... FROM STDIN (FORMAT BINARY)` payload, row by row.
pub struct PgCopy {
    out: Vec<u8>,
}

impl Default for PgCopy {
    fn default() -> Self {
        Self::new()
    }
}

impl PgCopy {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        out.extend_from_slice(&0i32.to_be_bytes()); // flags
        out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        PgCopy { out }
    }

    pub fn row(&mut self, fields: i16) {
        self.out.extend_from_slice(&fields.to_be_bytes());
    }

    pub fn field(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(bytes) => {
                let length = i32::try_from(bytes.len()).expect("a field over 2 GB");
                self.out.extend_from_slice(&length.to_be_bytes());
                self.out.extend_from_slice(bytes);
            }
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&(-1i16).to_be_bytes());
        self.out
    }
}

impl PyRecordBatch {
    /// The deltas of every chain not in `exclude`, as a binary COPY payload for the
    /// columns (execution_id, version, recorded_at, actor, event_mask, node_ids, data,
    /// lease_owner, lease_token).
    pub fn encode_copy(&self, exclude: &std::collections::HashSet<String>) -> Vec<u8> {
        let mut copy = PgCopy::new();
        for index in self.sorted_chains() {
            let chain = &self.chains[index];
            if exclude.contains(&*chain.execution_id) {
                continue;
            }
            for position in &chain.records {
                let record = &self.records[*position];
                let mut nodes = PgArray::new(TEXT_OID);
                for node_id in &record.node_ids {
                    nodes.push(Some(node_id.as_bytes()));
                }
                let mask = i32::try_from(event_mask(&record.event_types)).unwrap_or(i32::MAX);
                copy.row(9);
                copy.field(Some(chain.execution_id.as_bytes()));
                copy.field(Some(&int(record.state.version).to_be_bytes()));
                copy.field(Some(&(record.state.updated_at - PG_EPOCH_US).to_be_bytes()));
                copy.field(record.actor.as_deref().map(str::as_bytes));
                copy.field(Some(&mask.to_be_bytes()));
                copy.field(Some(&nodes.finish()));
                copy.field(Some(&record.delta));
                copy.field(None);
                copy.field(None);
            }
        }
        copy.finish()
    }

    /// Every array of the PostgreSQL batch statement: (name, element count, bytes).
    /// A chain's snapshot (when due) is at its last version.
    pub(crate) fn encode_pg(
        &self,
        snapshots: &[Option<Vec<u8>>],
    ) -> Vec<(&'static str, usize, Vec<u8>)> {
        let chains: Vec<ChainView<'_>> = self
            .sorted_chains()
            .into_iter()
            .map(|index| self.view(&self.chains[index], snapshots[index].as_deref()))
            .collect();
        encode_pg_chains(&chains)
    }
}

/// One execution's versions in a write, in version order: each with its snapshot
/// when it carries one, and the lease the chain is written under. The stores'
/// encoders (`encode_pg_chains`, `sqlite_chain`) take these, whether they come
/// from a write-behind `RecordBatch` or from the sync path's items.
pub(crate) struct ChainView<'a> {
    pub id: &'a str,
    pub records: Vec<&'a PyVersionRecord>,
    pub snapshots: Vec<Option<&'a [u8]>>,
    pub lease: Option<(&'a str, i64)>,
}

/// Every array of the PostgreSQL batch statement for `chains` (in the order given:
/// execution-id order, so that concurrent batches lock rows in one order): (name,
/// element count, bytes). A chain's row takes its first base version, its last
/// version, status and time, and its newest snapshot's version (NULL: keep).
pub(crate) fn encode_pg_chains(chains: &[ChainView<'_>]) -> Vec<(&'static str, usize, Vec<u8>)> {
    let text = || PgArray::new(TEXT_OID);
    let int8 = || PgArray::new(INT8_OID);
    let (mut u_id, mut u_status, mut u_lease_owner) = (text(), text(), text());
    let (mut u_base, mut u_version, mut u_updated, mut u_snapshot, mut u_lease_token) =
        (int8(), int8(), int8(), int8(), int8());
    let (mut c_id, mut c_workflow, mut c_status, mut c_forked_id) =
        (text(), text(), text(), text());
    let (mut c_version, mut c_created, mut c_updated, mut c_snapshot, mut c_forked_version) =
        (int8(), int8(), int8(), int8(), int8());
    let (mut d_id, mut d_actor, mut d_nodes, mut d_lease_owner) = (text(), text(), text(), text());
    let (mut d_version, mut d_recorded, mut d_mask, mut d_lease_token) =
        (int8(), int8(), int8(), int8());
    let mut d_data = PgArray::new(BYTEA_OID);
    let (mut s_id, mut s_version, mut s_data) = (text(), int8(), PgArray::new(BYTEA_OID));
    let (mut updates, mut creations) = (0, 0);
    for chain in chains {
        let id = chain.id.as_bytes();
        let (lease_owner, lease_token) = match chain.lease {
            Some((owner, token)) => (Some(owner.as_bytes()), Some(token)),
            None => (None, None),
        };
        let mut snapshot_version = None;
        for (record, snapshot) in chain.records.iter().zip(&chain.snapshots) {
            d_id.push(Some(id));
            d_version.push_int(Some(int(record.state.version)));
            d_recorded.push_int(Some(record.state.updated_at));
            d_actor.push(record.actor.as_deref().map(str::as_bytes));
            d_mask.push_int(Some(i64::from(event_mask(&record.event_types))));
            d_nodes.push(Some(text_array_literal(&record.node_ids).as_bytes()));
            d_data.push(Some(&record.delta));
            d_lease_owner.push(lease_owner);
            d_lease_token.push_int(lease_token);
            if let Some(bytes) = snapshot {
                s_id.push(Some(id));
                s_version.push_int(Some(int(record.state.version)));
                s_data.push(Some(bytes));
                snapshot_version = Some(int(record.state.version));
            }
        }
        let first = chain.records[0];
        let last = chain.records[chain.records.len() - 1];
        if first.base_version == 0 {
            creations += 1;
            c_id.push(Some(id));
            c_workflow.push(Some(first.state.workflow_id.as_bytes()));
            c_status.push(Some(last.state.status.as_str().as_bytes()));
            c_version.push_int(Some(int(last.state.version)));
            c_created.push_int(Some(first.state.created_at));
            c_updated.push_int(Some(last.state.updated_at));
            c_snapshot.push_int(Some(snapshot_version.unwrap_or(0)));
            match &first.state.forked_from {
                Some((fid, fv)) => {
                    c_forked_id.push(Some(fid.as_bytes()));
                    c_forked_version.push_int(Some(int(*fv)));
                }
                None => {
                    c_forked_id.push(None);
                    c_forked_version.push(None);
                }
            }
        } else {
            updates += 1;
            u_id.push(Some(id));
            u_base.push_int(Some(int(first.base_version)));
            u_version.push_int(Some(int(last.state.version)));
            u_status.push(Some(last.state.status.as_str().as_bytes()));
            u_updated.push_int(Some(last.state.updated_at));
            u_snapshot.push_int(snapshot_version);
            u_lease_owner.push(lease_owner);
            u_lease_token.push_int(lease_token);
        }
    }
    let deltas: usize = chains.iter().map(|c| c.records.len()).sum();
    let snapshot_count = chains
        .iter()
        .flat_map(|c| &c.snapshots)
        .filter(|s| s.is_some())
        .count();
    vec![
        ("u_id", updates, u_id.finish()),
        ("u_base", updates, u_base.finish()),
        ("u_version", updates, u_version.finish()),
        ("u_status", updates, u_status.finish()),
        ("u_updated", updates, u_updated.finish()),
        ("u_snapshot", updates, u_snapshot.finish()),
        ("u_lease_owner", updates, u_lease_owner.finish()),
        ("u_lease_token", updates, u_lease_token.finish()),
        ("c_id", creations, c_id.finish()),
        ("c_workflow", creations, c_workflow.finish()),
        ("c_status", creations, c_status.finish()),
        ("c_version", creations, c_version.finish()),
        ("c_created", creations, c_created.finish()),
        ("c_updated", creations, c_updated.finish()),
        ("c_snapshot", creations, c_snapshot.finish()),
        ("c_forked_id", creations, c_forked_id.finish()),
        ("c_forked_version", creations, c_forked_version.finish()),
        ("d_id", deltas, d_id.finish()),
        ("d_version", deltas, d_version.finish()),
        ("d_recorded", deltas, d_recorded.finish()),
        ("d_actor", deltas, d_actor.finish()),
        ("d_mask", deltas, d_mask.finish()),
        ("d_nodes", deltas, d_nodes.finish()),
        ("d_data", deltas, d_data.finish()),
        ("d_lease_owner", deltas, d_lease_owner.finish()),
        ("d_lease_token", deltas, d_lease_token.finish()),
        ("s_id", snapshot_count, s_id.finish()),
        ("s_version", snapshot_count, s_version.finish()),
        ("s_data", snapshot_count, s_data.finish()),
    ]
}

/// The statement's arrays as its parameters (name -> binary array), and whether it
/// has updates and creations.
fn pg_parameter_dict<'py>(
    py: Python<'py>,
    arrays: Vec<(&'static str, usize, Vec<u8>)>,
) -> PyResult<(Bound<'py, PyDict>, bool, bool)> {
    let has = |wanted: &str| {
        arrays
            .iter()
            .any(|(name, count, _)| *name == wanted && *count > 0)
    };
    let (has_updates, has_creations) = (has("u_id"), has("c_id"));
    let parameters = PyDict::new(py);
    for (name, _, bytes) in arrays {
        parameters.set_item(name, PyBytes::new(py, &bytes))?;
    }
    Ok((parameters, has_updates, has_creations))
}

/// One version of the sync path: `(record, snapshot or None, (lease owner, token) or
/// None)`.
pub(crate) type SyncItem<'py> = (
    PyRef<'py, PyVersionRecord>,
    Option<Bound<'py, PyBytes>>,
    Option<(String, i64)>,
);

/// The sync path's items as chains: grouped by execution in first-seen order (an
/// execution's items must be consecutive versions), each with the positions of its
/// items and the lease of its first.
pub(crate) fn item_chains<'a>(items: &'a [SyncItem<'a>]) -> Vec<(ChainView<'a>, Vec<usize>)> {
    group_positions(
        items
            .iter()
            .map(|(record, _, _)| &*record.state.execution_id),
    )
    .into_iter()
    .map(|(id, positions)| {
        let chain = ChainView {
            id,
            records: positions.iter().map(|p| &*items[*p].0).collect(),
            snapshots: positions
                .iter()
                .map(|p| items[*p].1.as_ref().map(|b| b.as_bytes()))
                .collect(),
            lease: items[positions[0]]
                .2
                .as_ref()
                .map(|(owner, token)| (owner.as_str(), *token)),
        };
        (chain, positions)
    })
    .collect()
}

/// The PostgreSQL batch statement's arrays for the sync path's group commit, chains
/// in execution-id order. Returns (name -> binary array, has updates, has
/// creations, has snapshots).
#[pyfunction]
pub fn pg_write_parameters<'py>(
    py: Python<'py>,
    items: Vec<SyncItem<'py>>,
) -> PyResult<(Bound<'py, PyDict>, bool, bool, bool)> {
    let mut chains: Vec<ChainView<'_>> = item_chains(&items).into_iter().map(|(c, _)| c).collect();
    chains.sort_by(|a, b| a.id.cmp(b.id));
    let has_snapshots = chains
        .iter()
        .flat_map(|c| &c.snapshots)
        .any(Option::is_some);
    let (parameters, has_updates, has_creations) =
        pg_parameter_dict(py, encode_pg_chains(&chains))?;
    Ok((parameters, has_updates, has_creations, has_snapshots))
}

/// The SQLite store's parameters for the sync path's items, per chain in first-seen
/// order: `(execution_id, positions of its items, first base version, executions
/// row, delta rows, snapshot rows)`.
#[pyfunction]
pub fn sqlite_write_rows<'py>(
    py: Python<'py>,
    items: Vec<SyncItem<'py>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    item_chains(&items)
        .iter()
        .map(|(chain, positions)| {
            let (row, deltas, snapshots) = sqlite_chain(py, chain)?;
            Ok((
                chain.id,
                positions.clone(),
                chain.records[0].base_version,
                row,
                deltas,
                snapshots,
            )
                .into_pyobject(py)?
                .into_any())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_array_has_no_dimension() {
        let bytes = PgArray::new(TEXT_OID).finish();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]);
    }

    #[test]
    fn array_with_null_is_flagged() {
        let mut array = PgArray::new(INT8_OID);
        array.push_int(Some(7));
        array.push_int(None);
        let bytes = array.finish();
        assert_eq!(&bytes[0..4], &1i32.to_be_bytes());
        assert_eq!(&bytes[4..8], &1i32.to_be_bytes());
        assert_eq!(&bytes[12..16], &2i32.to_be_bytes());
        assert_eq!(&bytes[20..24], &8i32.to_be_bytes());
        assert_eq!(&bytes[24..32], &7i64.to_be_bytes());
        assert_eq!(&bytes[32..36], &(-1i32).to_be_bytes());
    }

    #[test]
    fn literal_escapes_quotes_and_backslashes() {
        let values: Vec<Arc<str>> = vec!["a".into(), "b\"c\\".into()];
        assert_eq!(text_array_literal(&values), r#"{"a","b\"c\\"}"#);
        assert_eq!(text_array_literal(&[]), "{}");
    }

    fn record(id: &str, base: u64, version: u64) -> PyVersionRecord {
        let (mut state, _) = crate::model::create(id.into(), "wf".into(), vec![], vec![], 0, 0);
        state.version = version;
        PyVersionRecord::new(
            Arc::new(state),
            base,
            None,
            std::iter::once((EventKind::VariablesChanged, None, &b"d"[..])),
            0,
        )
    }

    #[test]
    fn sqlite_rows_pick_the_statement_and_survive_into_owned() {
        let creation = record("e", 0, 1);
        let update = record("e", 1, 2);
        let snapshot = b"snap".to_vec();
        let view = |records: Vec<&'static PyVersionRecord>, snapshot: Option<&'static [u8]>| {
            let snapshots = vec![snapshot; records.len()];
            ChainView {
                id: "e",
                records,
                snapshots,
                lease: Some(("owner", 7)),
            }
        };
        let creation: &'static PyVersionRecord = Box::leak(Box::new(creation));
        let update: &'static PyVersionRecord = Box::leak(Box::new(update));
        let snapshot: &'static [u8] = Box::leak(snapshot.into_boxed_slice());

        let rows = sqlite_chain_rows(&view(vec![creation], None));
        assert_eq!(rows.kind, RowKind::Insert);
        assert_eq!(rows.row.len(), 9);
        assert!(rows.snapshots.is_empty());

        // No version changed the status: the UPDATE without it, with the newest
        // snapshot's version, and the lease on every delta.
        let rows = sqlite_chain_rows(&view(vec![update], Some(snapshot))).into_owned();
        assert_eq!(rows.kind, RowKind::UpdateKeepStatus);
        assert_eq!(
            rows.row,
            vec![
                SqlValue::Int(2),
                SqlValue::Int(0),
                SqlValue::Int(2),
                SqlValue::Text("e".into()),
                SqlValue::Int(1),
            ]
        );
        assert_eq!(rows.deltas[0][7], SqlValue::Text("owner".into()));
        assert_eq!(rows.deltas[0][8], SqlValue::Int(7));
        assert_eq!(rows.deltas[0][5], SqlValue::Text("[]".into()));
        assert_eq!(
            rows.snapshots[0][2],
            SqlValue::Blob(b"snap".to_vec().into())
        );
    }

    /// The element count of a one-dimensional binary array (0 when empty).
    fn elements(arrays: &[(&'static str, usize, Vec<u8>)], name: &str) -> (usize, Vec<u8>) {
        let (_, count, bytes) = arrays.iter().find(|(n, _, _)| *n == name).unwrap();
        (*count, bytes.clone())
    }

    #[test]
    fn sync_chains_carry_their_lease_and_newest_snapshot() {
        let (a1, a2, b) = (record("a", 4, 5), record("a", 5, 6), record("b", 0, 1));
        let chains = [
            ChainView {
                id: "a",
                records: vec![&a1, &a2],
                snapshots: vec![Some(&b"s5"[..]), None],
                lease: Some(("owner", 7)),
            },
            ChainView {
                id: "b",
                records: vec![&b],
                snapshots: vec![None],
                lease: None,
            },
        ];
        let arrays = encode_pg_chains(&chains);
        assert_eq!(elements(&arrays, "u_id").0, 1);
        assert_eq!(elements(&arrays, "c_id").0, 1);
        assert_eq!(elements(&arrays, "d_id").0, 3);
        assert_eq!(elements(&arrays, "s_id").0, 1);
        // The update row: base 4, version 6, snapshot version 5 (the chain's newest),
        // lease token 7; each int8 element is its length (8) then the value.
        let value = |name: &str| {
            let (_, bytes) = elements(&arrays, name);
            i64::from_be_bytes(bytes[24..32].try_into().unwrap())
        };
        assert_eq!(value("u_base"), 4);
        assert_eq!(value("u_version"), 6);
        assert_eq!(value("u_snapshot"), 5);
        assert_eq!(value("u_lease_token"), 7);
        assert_eq!(value("s_version"), 5);
        // Both of the chain's deltas carry its lease; the creation's none (a NULL).
        let (_, tokens) = elements(&arrays, "d_lease_token");
        assert_eq!(&tokens[4..8], &1i32.to_be_bytes(), "has NULLs");
        assert_eq!(&tokens[24..32], &7i64.to_be_bytes());
        assert_eq!(&tokens[36..44], &7i64.to_be_bytes());
        assert_eq!(&tokens[44..48], &(-1i32).to_be_bytes());
    }

    #[test]
    fn every_kind_has_its_own_bit() {
        let kinds = EventKind::ALL;
        let mask = event_mask(&kinds);
        assert_eq!(mask.count_ones() as usize, kinds.len());
    }
}
