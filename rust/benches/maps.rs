//! Concurrent state-map comparison: which map should hold `execution id -> current state`?
//!
//! Run with `cargo bench --bench maps` (about 1.5 minutes). A std-only harness (no
//! criterion): workloads of get, CAS and insert on 10k and 1M pre-filled ids, each on 1, 2
//! and 4 threads, print two tables, ns/op and Mops/s, a row per workload and thread count,
//! a column per map, the best of each row starred.
//!
//! - ns/op is CPU time per op (the threads' CPU time over the ops): on one thread it is the
//!   latency of one op. Other work on the machine moves it less than wall time (it still
//!   grows when that work evicts the bench's data from the caches).
//! - Mops/s is ops of all threads per wall-clock second: the scaling figure. It is only
//!   meaningful on an otherwise idle machine; the `cpu%` column says how much of the cores
//!   the run actually got.
//! - The maps are all pre-filled at once and take turns, cell by cell, for `REPEATS`
//!   rounds; each cell keeps its best round. The insert-heavy workload runs last, on the
//!   same maps, which grow by up to `NEW_KEYS` ids.
//!
//! What is measured, per map:
//! - `insert`: insert-if-absent of a new id with a fresh `Arc<State>` (version 1);
//! - `get`: look the id up and clone its `Arc<State>` and version;
//! - `cas`: the read-modify-write the Python API drives (`apply`, `prepare`+`publish`):
//!   `get`, build the next state (a fresh `Arc<State>`), then compare-and-swap it in only if
//!   the version is still the one read. The swap is atomic with a side effect (the stand-in
//!   for "append to the event log" is a counter bumped inside the same critical section),
//!   so it runs under a lock: the slot's own `parking_lot::Mutex` (variants without a
//!   suffix: the map is only used to find the `Arc<Slot>`) or the map's own write lock on
//!   the entry/shard/bucket (`-e` variants). `papaya-c` does the swap with papaya's
//!   lock-free `compute`, which has no critical section to put the side effect in (its
//!   closure may run several times, and an append after it can land out of version
//!   order): it is shown for reference and is not eligible.
//!
//! Every map uses std's `RandomState` (SipHash-1-3), the default of each crate and the one
//! to keep for ids that come from users; the hand-rolled sharded map hashes once, like
//! dashmap, and picks the shard from bits below hashbrown's 7-bit tag.
//!
//! Tune the run time with `MEASURE_MS` / `WARMUP_MS` below, or at run time with the
//! environment variables `MAPS_BENCH_MEASURE_MS` / `MAPS_BENCH_WARMUP_MS`.

use std::borrow::Borrow;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Measured wall-clock time of one round of a cell (one map, workload, key count and
/// thread count).
const MEASURE_MS: u64 = 40;
/// Rounds of each cell, spread over the run; the table shows the best (other processes
/// on the machine only ever make a round slower).
const REPEATS: usize = 6;
/// Untimed run of the cell's get/CAS mix before each round, on the threads then measured
/// (the maps take turns, so their data has left the caches).
const WARMUP_MS: u64 = 12;
/// Key counts of the pre-filled map.
const KEY_COUNTS: [usize; 2] = [10_000, 1_000_000];
/// Thread counts (the table says how many cores the machine has).
const THREADS: [usize; 3] = [1, 2, 4];
/// Fresh ids for the insert-heavy workload: an equal share for each round of its cells,
/// split among the threads; a round that runs out stops early (its figures use the time it
/// actually ran). Every map gets the same ids.
const NEW_KEYS: usize = 1_500_000;
/// Operations between two looks at the clock.
const BATCH: usize = 256;
/// Shards of the hand-rolled sharded map.
const SHARDS: usize = 64;

// ---------------------------------------------------------------------------------------
// The state and the slot
// ---------------------------------------------------------------------------------------

/// A stand-in for one version of an execution's state: 168 bytes behind an `Arc`.
#[derive(Clone)]
struct State {
    version: u64,
    payload: [u64; 20],
}

impl State {
    fn first(seed: u64) -> Self {
        State {
            version: 1,
            payload: [seed; 20],
        }
    }

    /// The state an update computes from this one.
    fn next(&self) -> Self {
        let mut payload = self.payload;
        payload[(self.version % 20) as usize] = payload[0].wrapping_add(self.version);
        State {
            version: self.version + 1,
            payload,
        }
    }
}

/// What a slot holds: the current state, its version and the event-log stand-in.
struct Versioned {
    state: Arc<State>,
    version: u64,
    events: u64,
}

impl Versioned {
    fn new(state: Arc<State>) -> Self {
        Versioned {
            version: state.version,
            state,
            events: 1,
        }
    }

    fn read(&self) -> (Arc<State>, u64) {
        (Arc::clone(&self.state), self.version)
    }

    /// The compare-and-swap proper, run inside whatever lock guards this cell. On success
    /// it returns the replaced state so the caller can drop it after unlocking.
    fn swap(&mut self, expected: u64, new: Arc<State>) -> Result<Arc<State>, u64> {
        if self.version != expected {
            return Err(self.version);
        }
        self.version += 1;
        // The side effect that must be atomic with the swap (appending to the event log).
        self.events = black_box(self.events + 1);
        Ok(std::mem::replace(&mut self.state, new))
    }
}

/// A slot with its own lock: the map is only used to find it.
type Slot = parking_lot::Mutex<Versioned>;

fn new_slot(state: Arc<State>) -> Arc<Slot> {
    Arc::new(parking_lot::Mutex::new(Versioned::new(state)))
}

fn slot_read(slot: &Slot) -> (Arc<State>, u64) {
    slot.lock().read()
}

fn slot_swap(slot: &Slot, expected: u64, new: Arc<State>) -> Result<u64, u64> {
    let old = slot.lock().swap(expected, new)?;
    drop(old);
    Ok(expected + 1)
}

/// `Err(MISSING)` from `cas` when the id is absent (versions start at 1).
const MISSING: u64 = 0;

/// The operations the core needs. Keys come as `&Arc<str>` because papaya's `compute` and
/// every insert need an owned key; the others look up by `&str`.
trait StateMap: Send + Sync + 'static {
    const NAME: &'static str;
    fn create() -> Self;
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool;
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)>;
    /// Ok(new version) or Err(current version, `MISSING` if absent).
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64>;
}

// ---------------------------------------------------------------------------------------
// (a) dashmap
// ---------------------------------------------------------------------------------------

struct Dash(dashmap::DashMap<Arc<str>, Arc<Slot>>);

impl StateMap for Dash {
    const NAME: &'static str = "dash";
    fn create() -> Self {
        Dash(dashmap::DashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        match self.0.entry(Arc::clone(key)) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(new_slot(state));
                true
            }
        }
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.get(&**key).map(|slot| slot_read(&slot))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        match self.0.get(&**key) {
            Some(slot) => slot_swap(&slot, expected, new),
            None => Err(MISSING),
        }
    }
}

struct DashEntry(dashmap::DashMap<Arc<str>, Versioned>);

impl StateMap for DashEntry {
    const NAME: &'static str = "dash-e";
    fn create() -> Self {
        DashEntry(dashmap::DashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        match self.0.entry(Arc::clone(key)) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(Versioned::new(state));
                true
            }
        }
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.get(&**key).map(|cell| cell.read())
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let old = match self.0.get_mut(&**key) {
            Some(mut cell) => cell.swap(expected, new)?,
            None => return Err(MISSING),
        };
        drop(old);
        Ok(expected + 1)
    }
}

// ---------------------------------------------------------------------------------------
// (b) scc
// ---------------------------------------------------------------------------------------

struct Scc(scc::HashMap<Arc<str>, Arc<Slot>>);

impl StateMap for Scc {
    const NAME: &'static str = "scc";
    fn create() -> Self {
        Scc(scc::HashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        self.0.insert_sync(Arc::clone(key), new_slot(state)).is_ok()
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.read_sync(&**key, |_, slot| slot_read(slot))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        self.0
            .read_sync(&**key, |_, slot| slot_swap(slot, expected, new))
            .unwrap_or(Err(MISSING))
    }
}

struct SccEntry(scc::HashMap<Arc<str>, Versioned>);

impl StateMap for SccEntry {
    const NAME: &'static str = "scc-e";
    fn create() -> Self {
        SccEntry(scc::HashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        self.0
            .insert_sync(Arc::clone(key), Versioned::new(state))
            .is_ok()
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.read_sync(&**key, |_, cell| cell.read())
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let old = self
            .0
            .update_sync(&**key, |_, cell| cell.swap(expected, new))
            .unwrap_or(Err(MISSING))?;
        drop(old);
        Ok(expected + 1)
    }
}

// ---------------------------------------------------------------------------------------
// (c) papaya
// ---------------------------------------------------------------------------------------

struct Papaya(papaya::HashMap<Arc<str>, Arc<Slot>>);

impl StateMap for Papaya {
    const NAME: &'static str = "papaya";
    fn create() -> Self {
        Papaya(papaya::HashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        self.0
            .pin()
            .try_insert(Arc::clone(key), new_slot(state))
            .is_ok()
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.pin().get(&**key).map(|slot| slot_read(slot))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        match self.0.pin().get(&**key) {
            Some(slot) => slot_swap(slot, expected, new),
            None => Err(MISSING),
        }
    }
}

/// Values are immutable here: a swap installs a new `(state, version)` pair.
struct PapayaCompute(papaya::HashMap<Arc<str>, (Arc<State>, u64)>);

impl StateMap for PapayaCompute {
    const NAME: &'static str = "papaya-c";
    fn create() -> Self {
        PapayaCompute(papaya::HashMap::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        let version = state.version;
        self.0
            .pin()
            .try_insert(Arc::clone(key), (state, version))
            .is_ok()
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0
            .pin()
            .get(&**key)
            .map(|(state, version)| (Arc::clone(state), *version))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let map = self.0.pin();
        let outcome = map.compute(Arc::clone(key), |entry| match entry {
            Some((_, (_, version))) if *version == expected => {
                papaya::Operation::Insert((Arc::clone(&new), expected + 1))
            }
            Some((_, (_, version))) => papaya::Operation::Abort(*version),
            None => papaya::Operation::Abort(MISSING),
        });
        match outcome {
            papaya::Compute::Updated { .. } => Ok(expected + 1),
            papaya::Compute::Aborted(current) => Err(current),
            papaya::Compute::Inserted(..) | papaya::Compute::Removed(..) => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// (d) hand-rolled sharded map: 64 x parking_lot::RwLock<std HashMap>, hashing once
// ---------------------------------------------------------------------------------------

/// A key with its hash computed once (by `RandomState`), so the shard's table reuses it.
struct HashedKey {
    hash: u64,
    key: Arc<str>,
}

/// What a lookup borrows a `HashedKey` as, so `&str` lookups need no `Arc`.
trait KeyView {
    fn hash_value(&self) -> u64;
    fn text(&self) -> &str;
}

impl KeyView for HashedKey {
    fn hash_value(&self) -> u64 {
        self.hash
    }
    fn text(&self) -> &str {
        &self.key
    }
}

struct Probe<'a> {
    hash: u64,
    key: &'a str,
}

impl KeyView for Probe<'_> {
    fn hash_value(&self) -> u64 {
        self.hash
    }
    fn text(&self) -> &str {
        self.key
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for HashedKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash_value());
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash_value() == other.hash_value() && self.text() == other.text()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for HashedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for HashedKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl Eq for HashedKey {}

/// Passes the precomputed hash through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Keeps each shard's lock on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

type ShardTable<V> = parking_lot::RwLock<HashMap<HashedKey, V, BuildHasherDefault<PassThrough>>>;
type Shard<V> = Padded<ShardTable<V>>;

struct Sharded<V> {
    hasher: RandomState,
    shards: Box<[Shard<V>]>,
}

impl<V> Sharded<V> {
    fn new() -> Self {
        Sharded {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Padded(parking_lot::RwLock::new(HashMap::default())))
                .collect(),
        }
    }

    /// The hash and the shard of a key: like dashmap, skip the top 7 bits, which hashbrown
    /// uses as the tag inside a table.
    fn locate(&self, key: &str) -> (u64, &ShardTable<V>) {
        let hash = self.hasher.hash_one(key);
        let index = ((hash << 7) >> (64 - SHARDS.trailing_zeros())) as usize;
        (hash, &self.shards[index].0)
    }

    fn insert_with(&self, key: &Arc<str>, value: impl FnOnce() -> V) -> bool {
        let (hash, shard) = self.locate(key);
        match shard.write().entry(HashedKey {
            hash,
            key: Arc::clone(key),
        }) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(value());
                true
            }
        }
    }
}

fn probe(hash: u64, key: &str) -> Probe<'_> {
    Probe { hash, key }
}

struct ShardedSlots(Sharded<Arc<Slot>>);

impl StateMap for ShardedSlots {
    const NAME: &'static str = "shard64";
    fn create() -> Self {
        ShardedSlots(Sharded::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        self.0.insert_with(key, || new_slot(state))
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        let (hash, shard) = self.0.locate(key);
        let guard = shard.read();
        guard
            .get(&probe(hash, key) as &dyn KeyView)
            .map(|slot| slot_read(slot))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let (hash, shard) = self.0.locate(key);
        let guard = shard.read();
        match guard.get(&probe(hash, key) as &dyn KeyView) {
            Some(slot) => slot_swap(slot, expected, new),
            None => Err(MISSING),
        }
    }
}

struct ShardedEntry(Sharded<Versioned>);

impl StateMap for ShardedEntry {
    const NAME: &'static str = "shard64-e";
    fn create() -> Self {
        ShardedEntry(Sharded::new())
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        self.0.insert_with(key, || Versioned::new(state))
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        let (hash, shard) = self.0.locate(key);
        let guard = shard.read();
        guard
            .get(&probe(hash, key) as &dyn KeyView)
            .map(Versioned::read)
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let (hash, shard) = self.0.locate(key);
        let mut guard = shard.write();
        let old = match guard.get_mut(&probe(hash, key) as &dyn KeyView) {
            Some(cell) => cell.swap(expected, new)?,
            None => return Err(MISSING),
        };
        drop(guard);
        drop(old);
        Ok(expected + 1)
    }
}

// ---------------------------------------------------------------------------------------
// (e) the naive baseline: one std::sync::RwLock<HashMap>
// ---------------------------------------------------------------------------------------

struct StdRw(std::sync::RwLock<HashMap<Arc<str>, Arc<Slot>>>);

impl StateMap for StdRw {
    const NAME: &'static str = "std-rw";
    fn create() -> Self {
        StdRw(std::sync::RwLock::new(HashMap::new()))
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        match self.0.write().unwrap().entry(Arc::clone(key)) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(new_slot(state));
                true
            }
        }
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0
            .read()
            .unwrap()
            .get(&**key)
            .map(|slot| slot_read(slot))
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        match self.0.read().unwrap().get(&**key) {
            Some(slot) => slot_swap(slot, expected, new),
            None => Err(MISSING),
        }
    }
}

struct StdRwEntry(std::sync::RwLock<HashMap<Arc<str>, Versioned>>);

impl StateMap for StdRwEntry {
    const NAME: &'static str = "std-rw-e";
    fn create() -> Self {
        StdRwEntry(std::sync::RwLock::new(HashMap::new()))
    }
    fn insert(&self, key: &Arc<str>, state: Arc<State>) -> bool {
        match self.0.write().unwrap().entry(Arc::clone(key)) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(Versioned::new(state));
                true
            }
        }
    }
    fn get(&self, key: &Arc<str>) -> Option<(Arc<State>, u64)> {
        self.0.read().unwrap().get(&**key).map(Versioned::read)
    }
    fn cas(&self, key: &Arc<str>, expected: u64, new: Arc<State>) -> Result<u64, u64> {
        let mut guard = self.0.write().unwrap();
        let old = match guard.get_mut(&**key) {
            Some(cell) => cell.swap(expected, new)?,
            None => return Err(MISSING),
        };
        drop(guard);
        drop(old);
        Ok(expected + 1)
    }
}

// ---------------------------------------------------------------------------------------
// Workloads and the harness
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Workload {
    label: &'static str,
    insert_pct: u64,
    get_pct: u64,
    // The rest is CAS.
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        label: "get90/cas10",
        insert_pct: 0,
        get_pct: 90,
    },
    Workload {
        label: "get50/cas50",
        insert_pct: 0,
        get_pct: 50,
    },
    Workload {
        label: "ins50/get40/cas10",
        insert_pct: 50,
        get_pct: 40,
    },
];

/// xorshift64*, seeded through splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(splitmix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A UUIDv7-shaped id: a time-ordered 48-bit prefix (unique per `n`), then random bits,
/// like the ids `create_execution(None, ...)` generates.
fn make_id(n: u64, salt: u64) -> Arc<str> {
    let r = splitmix(n ^ salt.rotate_left(32));
    let ms = 0x0190_0000_0000u64 + n;
    Arc::from(format!(
        "{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}",
        ms >> 16,
        ms & 0xffff,
        r & 0xfff,
        0x8000 | ((r >> 12) & 0x3fff),
        (r >> 16) & 0xffff_ffff_ffff
    ))
}

#[derive(Default, Clone, Copy)]
struct Counts {
    ops: u64,
    cas_ok: u64,
    /// Time the thread spent on a core, where the OS tells it.
    cpu_ns: Option<u64>,
}

/// This thread's CPU time so far, in ns (`CLOCK_THREAD_CPUTIME_ID`, from the C library std
/// already links).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, time: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut time = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable `struct timespec` (two 64-bit fields on 64-bit
    // Linux) and the clock id is a constant the C library knows.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut time) };
    let secs = u64::try_from(time.tv_sec).ok()?;
    let nanos = u64::try_from(time.tv_nsec).ok()?;
    (rc == 0).then_some(secs * 1_000_000_000 + nanos)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

/// The figures of one run of a cell.
#[derive(Clone, Copy)]
struct Sample {
    /// CPU time per op: the threads' CPU time / ops (where the OS can't tell CPU time:
    /// threads x wall / ops).
    ns: f64,
    /// Ops of all threads together per wall-clock second, in millions.
    mops: f64,
    /// Time the threads were on a core / (wall x min(threads, cores)).
    cpu: Option<f64>,
    cas_ok: u64,
}

fn worker<M: StateMap>(
    map: &M,
    keys: &[Arc<str>],
    new_keys: &[Arc<str>],
    workload: Workload,
    seed: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> Counts {
    let cpu_start = thread_cpu_ns();
    let mut rng = Rng::new(seed);
    let n = keys.len() as u64;
    let mut fresh = new_keys.iter();
    let mut counts = Counts::default();
    'run: loop {
        for _ in 0..BATCH {
            let r = rng.next();
            let pct = r % 100;
            let key = &keys[(((r >> 32) * n) >> 32) as usize];
            if pct < workload.insert_pct {
                let Some(id) = fresh.next() else {
                    stop.store(true, Ordering::Relaxed);
                    break 'run;
                };
                let created = map.insert(id, Arc::new(State::first(r)));
                assert!(created, "{}: fresh id already present", M::NAME);
            } else if pct < workload.insert_pct + workload.get_pct {
                let (state, version) = map.get(key).expect("pre-filled id missing");
                black_box((&state, version));
            } else {
                let (state, version) = map.get(key).expect("pre-filled id missing");
                let next = Arc::new(state.next());
                drop(state);
                if map.cas(key, version, next).is_ok() {
                    counts.cas_ok += 1;
                }
            }
            counts.ops += 1;
        }
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
    }
    counts.cpu_ns = cpu_start.zip(thread_cpu_ns()).map(|(a, b)| b - a);
    counts
}

/// Runs one cell once: each thread warms up on the get/CAS part of the workload (so the
/// data is in its core's caches), then all are measured together.
fn run_cell<M: StateMap>(
    map: &M,
    keys: &[Arc<str>],
    new_keys: &[Arc<str>],
    spec: RunSpec,
    seed: u64,
) -> Sample {
    let RunSpec {
        workload,
        threads,
        warmup,
        duration,
    } = spec;
    let warm = Workload {
        insert_pct: 0,
        ..workload
    };
    let barrier = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let chunk = new_keys.len() / threads;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, stop) = (&barrier, &stop);
                let mine = &new_keys[t * chunk..(t + 1) * chunk];
                let seed = seed.wrapping_mul(31).wrapping_add(t as u64);
                scope.spawn(move || {
                    let never = AtomicBool::new(false);
                    let deadline = Instant::now() + warmup;
                    let warmed = worker(map, keys, &[], warm, !seed, deadline, &never);
                    barrier.wait();
                    let deadline = Instant::now() + duration;
                    let mut counts = worker(map, keys, mine, workload, seed, deadline, stop);
                    counts.cas_ok += warmed.cas_ok;
                    counts
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut total = Counts {
            cpu_ns: Some(0),
            ..Counts::default()
        };
        for handle in handles {
            let c = handle.join().expect("worker panicked");
            total.ops += c.ops;
            total.cas_ok += c.cas_ok;
            total.cpu_ns = total.cpu_ns.zip(c.cpu_ns).map(|(a, b)| a + b);
        }
        let secs = start.elapsed().as_secs_f64();
        let ops = total.ops as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Sample {
            ns: total
                .cpu_ns
                .map_or(secs * 1e9 * threads as f64, |cpu| cpu as f64)
                / ops,
            mops: ops / secs / 1e6,
            cpu: total
                .cpu_ns
                .map(|cpu| cpu as f64 / (secs * 1e9 * threads.min(cores) as f64)),
            cas_ok: total.cas_ok,
        }
    })
}

/// A map holding every id of `keys` at version 1, filled by one thread per core.
fn prefill<M: StateMap>(keys: &[Arc<str>]) -> M {
    let map = M::create();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = keys.len().div_ceil(cores);
    std::thread::scope(|scope| {
        for (c, part) in keys.chunks(chunk).enumerate() {
            let map = &map;
            scope.spawn(move || {
                for (i, key) in part.iter().enumerate() {
                    let seed = (c * chunk + i) as u64;
                    assert!(map.insert(key, Arc::new(State::first(seed))));
                }
            });
        }
    });
    map
}

/// The semantics every variant must have, checked before it is timed.
fn self_test<M: StateMap>() {
    let map = M::create();
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    assert!(map.insert(&a, Arc::new(State::first(7))));
    assert!(!map.insert(&a, Arc::new(State::first(8))), "{}", M::NAME);
    let (state, version) = map.get(&a).unwrap();
    assert_eq!((state.payload[0], version), (7, 1), "{}", M::NAME);
    assert_eq!(
        map.cas(&a, 2, Arc::new(state.next())),
        Err(1),
        "{}",
        M::NAME
    );
    assert_eq!(map.cas(&a, 1, Arc::new(state.next())), Ok(2), "{}", M::NAME);
    assert_eq!(
        map.cas(&a, 1, Arc::new(state.next())),
        Err(2),
        "{}",
        M::NAME
    );
    assert_eq!(map.get(&a).unwrap().1, 2, "{}", M::NAME);
    assert!(map.get(&b).is_none(), "{}", M::NAME);
    assert_eq!(map.cas(&b, 1, state), Err(MISSING), "{}", M::NAME);
}

/// What one run of a cell does.
#[derive(Clone, Copy)]
struct RunSpec {
    workload: Workload,
    threads: usize,
    warmup: Duration,
    duration: Duration,
}

fn env_ms(name: &str, default: u64) -> Duration {
    let ms = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_millis(ms)
}

/// A pre-filled map under test, behind a trait object so that the maps can take turns.
trait Contender {
    /// Runs one cell once; counts its successful CAS.
    fn run(&mut self, keys: &[Arc<str>], fresh: &[Arc<str>], spec: RunSpec, seed: u64) -> Sample;
    /// Every successful CAS must have added exactly one version.
    fn check(&self, keys: &[Arc<str>]);
}

struct Prefilled<M> {
    map: M,
    cas_ok: u64,
}

impl<M: StateMap> Contender for Prefilled<M> {
    fn run(&mut self, keys: &[Arc<str>], fresh: &[Arc<str>], spec: RunSpec, seed: u64) -> Sample {
        let sample = run_cell(&self.map, keys, fresh, spec, seed);
        self.cas_ok += sample.cas_ok;
        sample
    }
    fn check(&self, keys: &[Arc<str>]) {
        let sum: u64 = keys
            .iter()
            .map(|k| self.map.get(k).expect("id missing").1)
            .sum();
        assert_eq!(
            sum,
            keys.len() as u64 + self.cas_ok,
            "{}: lost or extra versions",
            M::NAME
        );
    }
}

fn build<M: StateMap>(keys: &[Arc<str>]) -> Box<dyn Contender> {
    self_test::<M>();
    Box::new(Prefilled {
        map: prefill::<M>(keys),
        cas_ok: 0,
    })
}

type Build = fn(&[Arc<str>]) -> Box<dyn Contender>;

/// The columns of the table; `papaya-c` is shown but not eligible (see the top of the file).
const MAPS: [(&str, Build); 10] = [
    (Dash::NAME, build::<Dash>),
    (DashEntry::NAME, build::<DashEntry>),
    (Scc::NAME, build::<Scc>),
    (SccEntry::NAME, build::<SccEntry>),
    (Papaya::NAME, build::<Papaya>),
    (PapayaCompute::NAME, build::<PapayaCompute>),
    (ShardedSlots::NAME, build::<ShardedSlots>),
    (ShardedEntry::NAME, build::<ShardedEntry>),
    (StdRw::NAME, build::<StdRw>),
    (StdRwEntry::NAME, build::<StdRwEntry>),
];

/// Every map at one key count. All of them are pre-filled, then, workload by workload,
/// each round runs every thread count of every map once (the maps take turns, starting one
/// further each round), so that a burst of other work on the machine hits one round of
/// many maps rather than every round of one; each cell keeps its best round. The
/// insert-heavy workload comes last, as it grows the maps: each round inserts its own share
/// of `new_keys`, so its rows are for a map that grows from `keys.len()` ids. One
/// `Vec<Sample>` per row, in the order of `WORKLOADS` x `THREADS`, one sample per map.
fn bench_key_count(keys: &[Arc<str>], new_keys: &[Arc<str>], started: Instant) -> Vec<Vec<Sample>> {
    let measure = env_ms("MAPS_BENCH_MEASURE_MS", MEASURE_MS);
    let warmup = env_ms("MAPS_BENCH_WARMUP_MS", WARMUP_MS);
    let progress = |what: &str| {
        eprintln!(
            "[{:>5.1}s] {} keys: {what}",
            started.elapsed().as_secs_f64(),
            keys.len()
        );
    };
    let mut maps: Vec<Box<dyn Contender>> = MAPS
        .iter()
        .map(|(name, build)| {
            progress(&format!("pre-filling {name}"));
            build(keys)
        })
        .collect();
    let rows = WORKLOADS.len() * THREADS.len();
    let mut best: Vec<Vec<Option<Sample>>> = vec![vec![None; maps.len()]; rows];
    let share = new_keys.len() / (THREADS.len() * REPEATS);
    for (w, workload) in WORKLOADS.into_iter().enumerate() {
        progress(workload.label);
        for round in 0..REPEATS {
            for (t, threads) in THREADS.into_iter().enumerate() {
                let row = w * THREADS.len() + t;
                let seed = (row * REPEATS + round) as u64;
                let fresh = if workload.insert_pct == 0 {
                    &[][..]
                } else {
                    &new_keys[(t * REPEATS + round) * share..][..share]
                };
                let spec = RunSpec {
                    workload,
                    threads,
                    warmup,
                    duration: measure,
                };
                for i in 0..maps.len() {
                    let m = (i + round) % maps.len();
                    let sample = maps[m].run(keys, fresh, spec, seed);
                    // Keep the lowest ns/op and the highest Mops/s (with its cpu%).
                    let cell = best[row][m].get_or_insert(sample);
                    cell.ns = cell.ns.min(sample.ns);
                    if sample.mops > cell.mops {
                        (cell.mops, cell.cpu) = (sample.mops, sample.cpu);
                    }
                }
            }
        }
    }
    progress("checking versions, dropping the maps");
    for map in &maps {
        map.check(keys);
    }
    drop(maps);
    best.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|s| s.expect("every cell ran"))
                .collect()
        })
        .collect()
}

const LABEL_WIDTH: usize = 30;
const CELL_WIDTH: usize = 10;

fn row_label(keys: usize, workload: &Workload, threads: usize) -> String {
    let keys = if keys >= 1_000_000 {
        format!("{}M", keys / 1_000_000)
    } else {
        format!("{}k", keys / 1_000)
    };
    format!("{keys:>4} {:<18} {threads}t", workload.label)
}

/// One table: a row per (keys, workload, threads), a column per map, the best cell starred.
fn print_table(
    title: &str,
    rows: &[(String, Vec<Sample>)],
    pick: fn(&Sample) -> f64,
    lower_is_better: bool,
) {
    let mut out = String::new();
    let _ = writeln!(out, "\n{title}");
    let _ = write!(out, "{:<LABEL_WIDTH$}", "keys workload           thr");
    for (name, _) in MAPS {
        let _ = write!(out, "{name:>CELL_WIDTH$}");
    }
    out.push_str("  cpu%\n");
    for (label, cells) in rows {
        let values: Vec<f64> = cells.iter().map(pick).collect();
        let best = values.iter().copied().fold(
            if lower_is_better { f64::INFINITY } else { 0.0 },
            |a, b| {
                if lower_is_better {
                    a.min(b)
                } else {
                    a.max(b)
                }
            },
        );
        let _ = write!(out, "{label:<LABEL_WIDTH$}");
        for v in values {
            let mark = if v == best { '*' } else { ' ' };
            let text = if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            };
            let _ = write!(out, "{:>width$}{mark}", text, width = CELL_WIDTH - 1);
        }
        match cells.iter().filter_map(|c| c.cpu).reduce(f64::min) {
            Some(cpu) => {
                let _ = writeln!(out, "{:>6.0}", cpu * 100.0);
            }
            None => out.push_str("     -\n"),
        }
    }
    print!("{out}");
}

type RowFilter = fn(&str) -> bool;

/// Per map, the geometric mean over some rows of how far it is from the row's best: its
/// ns/op over the lowest, or the highest Mops/s over its own (1.00 = always the best).
fn print_summary(rows: &[(String, Vec<Sample>)]) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nDistance from the row's best, geometric mean (1.00 = always the best)"
    );
    let _ = write!(out, "{:<LABEL_WIDTH$}", "rows");
    for (name, _) in MAPS {
        let _ = write!(out, "{name:>CELL_WIDTH$}");
    }
    out.push('\n');
    let one_thread: RowFilter = |label| label.ends_with(" 1t");
    let selections: [(&str, RowFilter, bool); 3] = [
        ("ns/op, 1 thread", one_thread, true),
        (
            "ns/op, 1 thread, get/CAS",
            |label| label.ends_with(" 1t") && !label.contains("ins"),
            true,
        ),
        (
            "Mops/s, 2 and 4 threads",
            |label| !label.ends_with(" 1t"),
            false,
        ),
    ];
    for (name, keep, by_ns) in selections {
        let _ = write!(out, "{name:<LABEL_WIDTH$}");
        let kept: Vec<&Vec<Sample>> = rows
            .iter()
            .filter(|(l, _)| keep(l))
            .map(|(_, c)| c)
            .collect();
        for m in 0..MAPS.len() {
            let log_sum: f64 = kept
                .iter()
                .map(|cells| {
                    if by_ns {
                        let best = cells.iter().map(|c| c.ns).fold(f64::INFINITY, f64::min);
                        (cells[m].ns / best).ln()
                    } else {
                        let best = cells.iter().map(|c| c.mops).fold(0.0, f64::max);
                        (best / cells[m].mops).ln()
                    }
                })
                .sum();
            let _ = write!(
                out,
                "{:>CELL_WIDTH$.2}",
                (log_sum / kept.len() as f64).exp()
            );
        }
        out.push('\n');
    }
    print!("{out}");
}

/// The 1, 5 and 15-minute load averages, where the OS tells them (Linux).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

fn main() {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let measure = env_ms("MAPS_BENCH_MEASURE_MS", MEASURE_MS);
    let warmup = env_ms("MAPS_BENCH_WARMUP_MS", WARMUP_MS);
    println!(
        "wfstate state-map comparison: {cores} cores available (threads > cores are \
         oversubscribed); best of {REPEATS} rounds of {} ms per cell, each after {} ms of warm-up",
        measure.as_millis(),
        warmup.as_millis()
    );
    println!(
        "load average before the run: {} (more than a few tenths: other work is sharing \
         the cores, and the figures are noisy)",
        load_average()
    );
    println!(
        "ns/op = CPU time per op (all threads' CPU time / ops; on 1 thread, the latency of \
         one op); Mops/s = ops of all threads per wall-clock second; * = best in the row"
    );
    println!(
        "cpu% = the lowest, over the row's maps, of CPU time / (wall x min(threads, cores)) \
         in the best Mops/s round: below ~90 in a 1t row, other work took the core (Mops/s \
         is low then); in 2t/4t rows, waiting on locks lowers it too"
    );
    println!(
        "cas = get + build the next Arc<State> + compare-and-swap on the version read; \
         -e = CAS under the map's own entry lock; papaya-c = lock-free compute (not eligible)"
    );
    let mut rows: Vec<(String, Vec<Sample>)> = Vec::new();
    for (k, &count) in KEY_COUNTS.iter().enumerate() {
        let salt = k as u64 + 1;
        let keys: Vec<Arc<str>> = (0..count as u64).map(|i| make_id(i, salt)).collect();
        let new_keys: Vec<Arc<str>> = (0..NEW_KEYS as u64)
            .map(|i| make_id(count as u64 + i, salt))
            .collect();
        let first = rows.len();
        for workload in &WORKLOADS {
            for threads in THREADS {
                rows.push((row_label(count, workload, threads), Vec::new()));
            }
        }
        for (row, samples) in rows[first..]
            .iter_mut()
            .zip(bench_key_count(&keys, &new_keys, started))
        {
            row.1 = samples;
        }
    }
    print_table("ns/op (lower is better)", &rows, |c| c.ns, true);
    print_table("Mops/s (higher is better)", &rows, |c| c.mops, false);
    print_summary(&rows);
    println!("\ntotal run time {:.1} s", started.elapsed().as_secs_f64());
}
