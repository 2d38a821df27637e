//! Property tests of the two parts of the core that read untrusted input:
//!
//! * the header parser (and everything downstream of it: layout detection, plans, copies) on
//!   arbitrary bytes and on structurally valid safetensors headers with mutated dtypes, shapes,
//!   offsets, lengths, truncations and bit flips: opening never panics, every failure is a
//!   typed error, no allocation follows a size the file claims, and whatever opens and is
//!   detected as an expert group loads exactly the bytes the layout's definition says;
//! * plan building and execution on random valid layouts (fused, transposed, interleaved,
//!   pre-v5 names, per-expert; 1, 2, 4 and 8-byte dtypes; biases; several shards), random TP
//!   ranks, expert lists with replicas and staging windows, in both read modes, against a
//!   naive reference that indexes the stored tensors by the layout's definition (DESIGN.md §1-2).
//!
//! The default case counts keep `cargo test` quick; set `PROPTEST_CASES` for longer runs by
//! hand, e.g. `PROPTEST_CASES=20000 cargo test --release -p fastmoe-load-core --test
//! fuzz_props`.

mod common;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use common::{write, TempDir, Tensor};
use fastmoe_load_core::layout::ExpertTensors;
use fastmoe_load_core::plan::OP_BYTES;
use fastmoe_load_core::{
    detect, Checkpoint, CopyPlan, Dtype, Error, Executor, LoadRequest, MoeLayer, ReadMode, Target,
};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------------
// Largest single allocation made by this thread while a closure runs: a header that claims
// 2^60 elements must not make the parser, the layout detection or the planner ask for memory
// in proportion.

struct TrackingAllocator;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: never panic inside the allocator, even while a thread is torn down.
    let tracking = TRACKING.try_with(Cell::get).unwrap_or(false);
    if tracking {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: forwarded from the caller.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: forwarded from the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let result = f();
    TRACKING.with(|t| t.set(false));
    (result, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Case counts and shared helpers

/// `PROPTEST_CASES` if set, else `default` (kept small so `cargo test` stays quick).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        // Failures print their minimal input, which becomes a regression test in this file;
        // nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The executors every plan runs on: both read modes, readahead, one and several threads.
fn executors() -> &'static [(&'static str, Executor)] {
    static EXECUTORS: OnceLock<Vec<(&'static str, Executor)>> = OnceLock::new();
    EXECUTORS.get_or_init(|| {
        vec![
            ("map/2", Executor::new(2, ReadMode::Map)),
            ("read/2", Executor::new(2, ReadMode::Read)),
            (
                "map/3+prefetch",
                Executor::new(3, ReadMode::Map).with_prefetch(true),
            ),
            ("read/1", Executor::new(1, ReadMode::Read)),
        ]
    })
}

/// Deterministic pseudo-random bytes (splitmix64).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Errors are typed: a variant of the core's enum whose message is not empty and names a
/// path. (A panic is caught by proptest and fails the case.)
fn check_error(err: &Error, path: &Path) -> Result<(), TestCaseError> {
    let message = err.to_string();
    prop_assert!(!message.is_empty());
    let named = match err {
        Error::Io { path, .. }
        | Error::Header { path, .. }
        | Error::Checkpoint { path, .. }
        | Error::TensorNotFound { path, .. }
        | Error::Layout { path, .. }
        | Error::Request { path, .. }
        | Error::FileChanged { path, .. } => path.clone(),
    };
    prop_assert!(
        named.starts_with(path) || path.starts_with(&named) || named.as_os_str().is_empty(),
        "error names {} instead of a file under {}: {message}",
        named.display(),
        path.display()
    );
    Ok(())
}

/// How far the cases of a fuzz target got: a generator that never produces a file that
/// opens, or never an expert group, tests little. Printed with `--nocapture`.
#[derive(Default, Debug)]
struct Reached {
    cases: AtomicUsize,
    open_errors: AtomicUsize,
    opened: AtomicUsize,
    detect_errors: AtomicUsize,
    groups: AtomicUsize,
    plan_errors: AtomicUsize,
    plans_run: AtomicUsize,
    bytes_compared: AtomicUsize,
    /// Why files were refused at open: the start of each message, counted.
    refusals: Mutex<BTreeMap<String, usize>>,
}

impl Reached {
    fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

/// Runs `body` on `cases` values of `strategy` (shrinking failures to a minimal case) and
/// returns how far the cases got.
fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    body: impl Fn(S::Value, &Reached) -> Result<(), TestCaseError>,
) -> Reached
where
    S::Value: std::fmt::Debug,
{
    let reached = Reached::default();
    let mut runner = TestRunner::new(cases(default_cases));
    let result = runner.run(&strategy, |value| {
        Reached::add(&reached.cases, 1);
        body(value, &reached)
    });
    eprintln!("{name}: {reached:?}");
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
    reached
}

// ---------------------------------------------------------------------------------------------
// The reference: destination contents computed directly from stored bytes and the layout's
// definition, without the core's views or plans.

/// A stored tensor: its shape, element size and bytes.
#[derive(Clone, Copy)]
struct Stored<'a> {
    name: &'a str,
    shape: &'a [usize],
    elem: usize,
    bytes: &'a [u8],
}

impl<'a> Stored<'a> {
    /// The element at a row-major index; the index must lie inside the shape.
    fn at(&self, index: &[usize]) -> &'a [u8] {
        assert_eq!(index.len(), self.shape.len(), "{}: rank", self.name);
        let mut flat = 0usize;
        for (&i, &n) in index.iter().zip(self.shape) {
            assert!(
                i < n,
                "{}: index {index:?} outside {:?}",
                self.name,
                self.shape
            );
            flat = flat * n + i;
        }
        &self.bytes[flat * self.elem..(flat + 1) * self.elem]
    }
}

/// Which expert matrix: gate/up `(i, h)`, down `(h, i)`, biases `(0, j)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum M {
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// A routed-expert group by definition (DESIGN.md §1-2).
enum Def<'a> {
    Fused {
        gate_up: Stored<'a>,
        down: Stored<'a>,
        biases: Option<(Stored<'a>, Stored<'a>)>,
        transposed: bool,
        interleaved: bool,
    },
    PerExpert {
        weights: [Vec<Stored<'a>>; 3],
        biases: Option<[Vec<Stored<'a>>; 3]>,
    },
}

impl Def<'_> {
    /// Element `(r, c)` of matrix `m` of expert `e`, for intermediate size `inter`.
    fn value(&self, m: M, e: usize, r: usize, c: usize, inter: usize) -> &[u8] {
        match self {
            Def::Fused {
                gate_up,
                down,
                biases,
                transposed,
                interleaved,
            } => {
                // Position of gate/up row `j` on the 2I axis.
                let along = |up: bool, j: usize| match (interleaved, up) {
                    (true, false) => 2 * j,
                    (true, true) => 2 * j + 1,
                    (false, false) => j,
                    (false, true) => inter + j,
                };
                let bias = || biases.as_ref().expect("a bias of a group without biases");
                match (m, transposed) {
                    (M::Gate | M::Up, false) => gate_up.at(&[e, along(m == M::Up, r), c]),
                    (M::Gate | M::Up, true) => gate_up.at(&[e, c, along(m == M::Up, r)]),
                    (M::Down, false) => down.at(&[e, r, c]),
                    (M::Down, true) => down.at(&[e, c, r]),
                    (M::GateBias | M::UpBias, _) => bias().0.at(&[e, along(m == M::UpBias, c)]),
                    (M::DownBias, _) => bias().1.at(&[e, c]),
                }
            }
            Def::PerExpert { weights, biases } => {
                let bias =
                    |k: usize| &biases.as_ref().expect("a bias of a group without biases")[k];
                match m {
                    M::Gate => weights[0][e].at(&[r, c]),
                    M::Up => weights[1][e].at(&[r, c]),
                    M::Down => weights[2][e].at(&[r, c]),
                    M::GateBias => bias(0)[e].at(&[c]),
                    M::UpBias => bias(1)[e].at(&[c]),
                    M::DownBias => bias(2)[e].at(&[c]),
                }
            }
        }
    }
}

/// The destination a plan must fill: vLLM's `w13 [n, 2I/tp, H]`, `w2 [n, H, I/tp]`,
/// `w13_bias [n, 2I/tp]`, `w2_bias [n, H]` for the slots' experts.
fn reference(def: &Def, layer: &MoeLayer, target: Target, request: &LoadRequest) -> Vec<u8> {
    let (h, inter) = (layer.hidden_size, layer.intermediate_size);
    let shard = inter / request.tp_size;
    let first = request.tp_rank * shard;
    let n = request.experts.len();
    let factors: &[usize] = match target {
        Target::W13 => &[n, shard, h],
        Target::W2 => &[n, h, shard],
        Target::W13Bias => &[n, shard],
        Target::W2Bias => &[n, h],
        Target::W13Companion(_) | Target::W2Companion(_) => {
            unreachable!("the generated layers are unquantized; tests/quant.rs covers companions")
        }
    };
    // Zero elements: do not walk a huge but empty loop nest.
    if factors.contains(&0) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &e in request.experts {
        match target {
            Target::W13 => {
                for m in [M::Gate, M::Up] {
                    for r in 0..shard {
                        for c in 0..h {
                            out.extend_from_slice(def.value(m, e, first + r, c, inter));
                        }
                    }
                }
            }
            Target::W2 => {
                for r in 0..h {
                    for c in 0..shard {
                        out.extend_from_slice(def.value(M::Down, e, r, first + c, inter));
                    }
                }
            }
            Target::W13Bias => {
                for m in [M::GateBias, M::UpBias] {
                    for c in 0..shard {
                        out.extend_from_slice(def.value(m, e, 0, first + c, inter));
                    }
                }
            }
            Target::W2Bias => {
                for c in 0..h {
                    out.extend_from_slice(def.value(M::DownBias, e, 0, c, inter));
                }
            }
            Target::W13Companion(_) | Target::W2Companion(_) => unreachable!(),
        }
    }
    out
}

/// Runs `plan` whole and window by window (windows of at most `window` bytes) on every
/// executor, into destinations at an odd `misalign` from 16-byte alignment, and checks each
/// result against `expected`.
fn check_execution(
    ckpt: &Checkpoint,
    plan: &CopyPlan,
    expected: &[u8],
    window: usize,
    misalign: usize,
    what: &str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(plan.len(), expected.len(), "{}: plan length", what);
    // The operations tile the destination in order, none longer than OP_BYTES, and each
    // reads inside its shard.
    let mut at = 0;
    for op in plan.ops() {
        prop_assert_eq!(
            op.dst,
            at,
            "{}: operations do not tile the destination",
            what
        );
        prop_assert!(!op.is_empty() && op.len() <= OP_BYTES, "{}: {:?}", what, op);
        prop_assert!(
            op.src_end() <= ckpt.shards()[op.shard].len(),
            "{}: {:?}",
            what,
            op
        );
        at += op.len();
    }
    prop_assert_eq!(at, plan.len());
    let windows = plan.windows(window);
    let mut next = 0;
    for &(start, end) in &windows {
        prop_assert_eq!(start, next, "{}: windows leave a gap", what);
        prop_assert!(end > start);
        let ops = plan.ops_in(start, end);
        prop_assert!(
            ops.is_some(),
            "{}: window [{}, {}) not on op boundaries",
            what,
            start,
            end
        );
        prop_assert!(
            end - start <= window || ops.is_some_and(|o| o.len() == 1),
            "{}: window [{}, {}) longer than {}",
            what,
            start,
            end,
            window
        );
        next = end;
    }
    prop_assert_eq!(next, plan.len(), "{}: windows do not cover the plan", what);

    for (name, executor) in executors() {
        let mut buffer = vec![0xA5u8; plan.len() + 16 + misalign];
        let shift = buffer.as_ptr().align_offset(16) + misalign;
        let out = &mut buffer[shift..shift + plan.len()];
        // SAFETY: `out` is `plan.len()` bytes, exclusively ours for the call.
        let whole =
            unsafe { executor.run(ckpt.shards(), plan.ops(), out.as_mut_ptr(), 0, plan.len()) };
        prop_assert!(whole.is_ok(), "{} {}: {:?}", what, name, whole);
        prop_assert!(out == expected, "{}: {} whole plan differs", what, name);

        let mut pieces = Vec::with_capacity(plan.len());
        for &(start, end) in &windows {
            let ops = plan.ops_in(start, end).unwrap_or_default();
            let mut piece = vec![0x5Au8; end - start];
            // SAFETY: `piece` is `end - start` bytes, exclusively ours for the call.
            let result =
                unsafe { executor.run(ckpt.shards(), ops, piece.as_mut_ptr(), start, end - start) };
            prop_assert!(result.is_ok(), "{} {}: {:?}", what, name, result);
            pieces.extend_from_slice(&piece);
        }
        prop_assert!(
            pieces == expected,
            "{}: {} windowed plan differs",
            what,
            name
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) Hostile files

/// Every dtype name of the format, two that are not, and a number where a string belongs.
const DTYPES: [&str; 25] = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
    "F128",
    "bf16",
    "",
];

fn bits_of(dtype: &str) -> Option<u128> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "C64" | "F64" | "I64" | "U64" => 64,
        _ => return None,
    })
}

/// Dimensions that overflow products, or that a zero dimension makes legal.
const HUGE: [u64; 10] = [
    1 << 31,
    1 << 32,
    1 << 60,
    1 << 61,
    (1 << 62) + 3,
    1 << 62,
    1 << 63,
    (1 << 63) + 1,
    u64::MAX / 2,
    u64::MAX,
];

/// A dimension: mostly small, sometimes zero or huge.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1u64..6,
        2 => Just(0u64),
        2 => prop::sample::select(HUGE.to_vec()),
    ]
}

/// `(E, H, I)` of a group: mostly small and consistent; sometimes with a zero dimension,
/// which makes any other dimension legal in the format.
fn group_dims() -> impl Strategy<Value = (u64, u64, u64)> {
    prop_oneof![
        10 => (1u64..6, 1u64..6, 1u64..6),
        2 => (dim(), dim(), dim(), 0usize..3).prop_map(|(e, h, i, zero)| match zero {
            0 => (0, h, i),
            1 => (e, 0, i),
            _ => (e, h, 0),
        }),
        1 => (dim(), dim(), dim()),
    ]
}

/// One header entry before serialisation; offsets are filled in from the sizes unless a
/// mutation says otherwise.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
}

/// Tensor names of the routed-expert families, so that detection and plans get exercised.
fn family(prefix: &str, kind: u8, experts: u64, dims: (u64, u64, u64)) -> Vec<Entry> {
    let (e, h, i) = dims;
    let two_i = i.wrapping_mul(2);
    let entry = |name: String, shape: Vec<u64>| Entry {
        name,
        dtype: String::new(),
        shape,
    };
    match kind {
        // fused v5, then with biases, then transposed
        0..=2 => {
            let transposed = kind == 2;
            let mut v = vec![
                entry(
                    format!("{prefix}.gate_up_proj"),
                    if transposed {
                        vec![e, h, two_i]
                    } else {
                        vec![e, two_i, h]
                    },
                ),
                entry(
                    format!("{prefix}.down_proj"),
                    if transposed {
                        vec![e, i, h]
                    } else {
                        vec![e, h, i]
                    },
                ),
            ];
            if kind == 1 {
                v.push(entry(format!("{prefix}.gate_up_proj_bias"), vec![e, two_i]));
                v.push(entry(format!("{prefix}.down_proj_bias"), vec![e, h]));
            }
            v
        }
        // GraniteMoe's pre-v5 names
        3 => vec![
            entry(format!("{prefix}.input_linear.weight"), vec![e, two_i, h]),
            entry(format!("{prefix}.output_linear.weight"), vec![e, h, i]),
        ],
        // one tensor per expert, three namings, sometimes with biases
        _ => {
            let naming = [
                ["gate_proj", "up_proj", "down_proj"],
                ["w1", "w3", "w2"],
                ["linear", "linear_v", "linear_1"],
            ][usize::from(kind % 3)];
            let biases = kind >= 7;
            let mut v = Vec::new();
            // A huge expert count is not listed in full: the names then skip experts.
            for x in 0..experts.min(5) {
                v.push(entry(
                    format!("{prefix}.{x}.{}.weight", naming[0]),
                    vec![i, h],
                ));
                v.push(entry(
                    format!("{prefix}.{x}.{}.weight", naming[1]),
                    vec![i, h],
                ));
                v.push(entry(
                    format!("{prefix}.{x}.{}.weight", naming[2]),
                    vec![h, i],
                ));
                if biases {
                    v.push(entry(format!("{prefix}.{x}.{}.bias", naming[0]), vec![i]));
                    v.push(entry(format!("{prefix}.{x}.{}.bias", naming[1]), vec![i]));
                    v.push(entry(format!("{prefix}.{x}.{}.bias", naming[2]), vec![h]));
                }
            }
            v
        }
    }
}

/// A change to one entry of an otherwise consistent header.
#[derive(Debug, Clone)]
enum EntryMutation {
    Dtype(usize, usize),
    SetDim(usize, usize, u64),
    AddOne(usize, usize),
    DropDim(usize),
    PushDim(usize, u64),
    Rename(usize, String),
    Remove(usize),
}

/// A change to the data offsets, applied after they are computed from the sizes.
#[derive(Debug, Clone)]
enum OffsetMutation {
    Shift(usize, bool, i64),
    Set(usize, bool, u64),
    Swap(usize, usize),
}

/// A change to the serialised file.
#[derive(Debug, Clone)]
enum FileMutation {
    Truncate(prop::sample::Index),
    FlipBit(prop::sample::Index, u8),
    SetHeaderLen(u64),
    Append(Vec<u8>),
    Overwrite(prop::sample::Index, u8),
}

#[derive(Debug, Clone)]
struct HostileFile {
    entries: Vec<Entry>,
    group_dtype: usize,
    metadata: Option<BTreeMap<String, String>>,
    entry_mutations: Vec<EntryMutation>,
    offset_mutations: Vec<OffsetMutation>,
    file_mutations: Vec<FileMutation>,
    seed: u64,
}

fn hostile_file() -> impl Strategy<Value = HostileFile> {
    let prefix = prop::sample::select(vec![
        "model.layers.0.mlp.experts",
        "model.layers.1.block_sparse_moe.experts",
        "model.layers.2.block_sparse_moe",
        "model.layers.3.mlp.shared_experts",
        "x",
    ]);
    let group = (prefix, 0u8..10, group_dims(), 0usize..4).prop_map(|(p, kind, (e, h, i), n)| {
        // Per-expert groups list their experts: keep that list short.
        // Sometimes drop the last few tensors of a group.
        let mut v = family(p, kind, e, (e, h, i));
        v.truncate(v.len().saturating_sub(n / 2 * n));
        v
    });
    let extra = prop::collection::vec(
        (
            prop::sample::select(vec![
                "model.embed_tokens.weight",
                "lm_head.weight",
                "model.layers.0.mlp.gate_up_proj.weight",
                "model.layers.0.mlp.experts.0.gate_proj.weight",
                "model.layers.0.mlp.experts.9.up_proj.weight",
                "model.layers.0.mlp.experts.18446744073709551615.gate_proj.weight",
                "__metadata__",
                "",
                "é.\u{0}.weight",
            ]),
            prop::collection::vec(
                prop_oneof![6 => 1u64..6, 1 => Just(0u64), 1 => prop::sample::select(HUGE.to_vec())],
                0..4,
            ),
        )
            .prop_map(|(name, shape)| Entry {
                name: name.to_string(),
                dtype: "BF16".into(),
                shape,
            }),
        1..3,
    );
    // Most files hold only their groups; some have stray tensors beside them.
    let extra = prop_oneof![2 => Just(vec![]), 1 => extra];
    let index = any::<prop::sample::Index>();
    let entry_mutation = (
        0usize..64,
        0usize..4,
        dim(),
        "[a-z_.0-9]{0,12}",
        0usize..DTYPES.len(),
    )
        .prop_flat_map(|(t, d, v, name, dt)| {
            prop_oneof![
                Just(EntryMutation::Dtype(t, dt)),
                Just(EntryMutation::SetDim(t, d, v)),
                Just(EntryMutation::AddOne(t, d)),
                Just(EntryMutation::DropDim(t)),
                Just(EntryMutation::PushDim(t, v)),
                Just(EntryMutation::Rename(t, name)),
                Just(EntryMutation::Remove(t)),
            ]
        });
    let offset_mutation = prop_oneof![
        (0usize..64, any::<bool>(), -9i64..9).prop_map(|(t, e, d)| OffsetMutation::Shift(t, e, d)),
        (
            0usize..64,
            any::<bool>(),
            prop::sample::select(HUGE.to_vec())
        )
            .prop_map(|(t, e, v)| OffsetMutation::Set(t, e, v)),
        (0usize..64, 0usize..64).prop_map(|(a, b)| OffsetMutation::Swap(a, b)),
    ];
    let file_mutation = prop_oneof![
        index.clone().prop_map(FileMutation::Truncate),
        (index.clone(), 0u8..8).prop_map(|(i, b)| FileMutation::FlipBit(i, b)),
        prop_oneof![
            prop::sample::select(HUGE.to_vec()),
            0u64..64,
            Just(100_000_001u64)
        ]
        .prop_map(FileMutation::SetHeaderLen),
        prop::collection::vec(any::<u8>(), 1..9).prop_map(FileMutation::Append),
        (index, any::<u8>()).prop_map(|(i, b)| FileMutation::Overwrite(i, b)),
    ];
    let metadata = prop::option::of(prop::collection::btree_map(
        "[a-z]{0,5}",
        "[a-z]{0,5}",
        0..3,
    ));
    (
        prop::collection::vec(group, 1..3),
        extra,
        0usize..DTYPES.len(),
        metadata,
        prop_oneof![2 => Just(vec![]), 3 => prop::collection::vec(entry_mutation, 1..3)],
        prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(offset_mutation, 1..2)],
        prop_oneof![3 => Just(vec![]), 2 => prop::collection::vec(file_mutation, 1..3)],
        any::<u64>(),
    )
        .prop_map(
            |(groups, extra, group_dtype, metadata, em, om, fm, seed)| HostileFile {
                entries: groups.into_iter().flatten().chain(extra).collect(),
                group_dtype,
                metadata,
                entry_mutations: em,
                offset_mutations: om,
                file_mutations: fm,
                seed,
            },
        )
}

/// Data sections beyond this are not written in full (the header then describes more bytes
/// than the file holds), so that a case stays a small file.
const MAX_DATA: u128 = 1 << 18;

impl HostileFile {
    fn bytes(&self) -> Vec<u8> {
        let mut entries = self.entries.clone();
        // Weights take one random dtype (sub-byte and unknown ones included), extras keep
        // theirs.
        for e in entries.iter_mut().filter(|e| e.dtype.is_empty()) {
            e.dtype = DTYPES[self.group_dtype].into();
        }
        for m in &self.entry_mutations {
            let n = entries.len();
            if n == 0 {
                break;
            }
            match m {
                EntryMutation::Dtype(t, d) => entries[t % n].dtype = DTYPES[*d].into(),
                EntryMutation::SetDim(t, d, v) => {
                    let shape = &mut entries[t % n].shape;
                    if !shape.is_empty() {
                        let d = d % shape.len();
                        shape[d] = *v;
                    }
                }
                EntryMutation::AddOne(t, d) => {
                    let shape = &mut entries[t % n].shape;
                    if !shape.is_empty() {
                        let d = d % shape.len();
                        shape[d] = shape[d].wrapping_add(1);
                    }
                }
                EntryMutation::DropDim(t) => {
                    entries[t % n].shape.pop();
                }
                EntryMutation::PushDim(t, v) => entries[t % n].shape.push(*v),
                EntryMutation::Rename(t, name) => entries[t % n].name = name.clone(),
                EntryMutation::Remove(t) => {
                    entries.remove(t % n);
                }
            }
        }
        // Sizes as the format defines them, with exact arithmetic; contiguous offsets.
        let mut offsets = Vec::new();
        let mut at: u128 = 0;
        for e in &entries {
            let bits = bits_of(&e.dtype).unwrap_or(16);
            let elements = e
                .shape
                .iter()
                .try_fold(1u128, |a, &d| a.checked_mul(u128::from(d)));
            let size = elements
                .and_then(|n| n.checked_mul(bits))
                .map_or(u128::from(u64::MAX), |b| b / 8);
            let end = at.saturating_add(size);
            offsets.push([at, end]);
            at = end;
        }
        let total = at;
        for m in &self.offset_mutations {
            let n = offsets.len();
            if n == 0 {
                break;
            }
            match *m {
                OffsetMutation::Shift(t, end, d) => {
                    let o = &mut offsets[t % n][usize::from(end)];
                    *o = o.saturating_add_signed(i128::from(d));
                }
                OffsetMutation::Set(t, end, v) => offsets[t % n][usize::from(end)] = v.into(),
                OffsetMutation::Swap(a, b) => offsets.swap(a % n, b % n),
            }
        }
        let mut header = serde_json::Map::new();
        if let Some(metadata) = &self.metadata {
            header.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        for (e, [start, end]) in entries.iter().zip(&offsets) {
            let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
            header.insert(
                e.name.clone(),
                serde_json::json!({
                    "dtype": e.dtype,
                    "shape": e.shape,
                    "data_offsets": [clamp(*start), clamp(*end)],
                }),
            );
        }
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        let data_len = usize::try_from(total.min(MAX_DATA)).unwrap_or(0);
        bytes.extend(random_bytes(self.seed, data_len));
        for m in &self.file_mutations {
            match m {
                FileMutation::Truncate(i) => {
                    let len = i.index(bytes.len() + 1);
                    bytes.truncate(len);
                }
                FileMutation::FlipBit(i, bit) => {
                    if !bytes.is_empty() {
                        let at = i.index(bytes.len());
                        bytes[at] ^= 1 << bit;
                    }
                }
                FileMutation::SetHeaderLen(n) => {
                    if bytes.len() >= 8 {
                        bytes[..8].copy_from_slice(&n.to_le_bytes());
                    }
                }
                FileMutation::Append(extra) => bytes.extend_from_slice(extra),
                FileMutation::Overwrite(i, b) => {
                    if !bytes.is_empty() {
                        let at = i.index(bytes.len());
                        bytes[at] = *b;
                    }
                }
            }
        }
        bytes
    }
}

/// The stored tensors of a checkpoint, read back from its files by the test itself.
struct Files {
    bytes: Vec<Vec<u8>>,
}

impl Files {
    fn read(ckpt: &Checkpoint) -> Files {
        let bytes = ckpt
            .shards()
            .iter()
            .map(|s| std::fs::read(s.path()).unwrap_or_default())
            .collect();
        Files { bytes }
    }

    fn stored<'a>(&'a self, ckpt: &'a Checkpoint, name: &'a str) -> Stored<'a> {
        let (shard, entry) = ckpt.tensor(name).expect("a tensor of the layer");
        Stored {
            name,
            shape: &entry.shape,
            elem: entry
                .elem_bytes()
                .expect("detection admits whole-byte dtypes only"),
            bytes: &self.bytes[shard][entry.start..entry.end],
        }
    }
}

/// `a == b`, with every product computed exactly (no wrapping).
fn shape_is(shape: &[usize], want: &[u128]) -> bool {
    shape.len() == want.len() && shape.iter().zip(want).all(|(&s, &w)| s as u128 == w)
}

/// What the core detected, checked against the stored shapes with exact arithmetic, and
/// turned into the reference definition.
fn definition<'a>(
    ckpt: &'a Checkpoint,
    files: &'a Files,
    layer: &'a MoeLayer,
) -> Result<Def<'a>, TestCaseError> {
    let (e, h, i) = (
        layer.num_experts as u128,
        layer.hidden_size as u128,
        layer.intermediate_size as u128,
    );
    let stored = |name: &'a str| files.stored(ckpt, name);
    let check_dtype = |name: &str, dtype: Dtype| -> Result<(), TestCaseError> {
        let (_, entry) = ckpt.tensor(name).expect("a tensor of the layer");
        prop_assert_eq!(entry.dtype, dtype, "{}: dtype", name);
        Ok(())
    };
    Ok(match &layer.tensors {
        ExpertTensors::Stacked(_) => {
            return Err(TestCaseError::fail(format!(
                "{}: detected as stacked, a layout the generator never writes",
                layer.prefix
            )))
        }
        ExpertTensors::Fused(f) => {
            let (gate_up, down) = (stored(&f.gate_up), stored(&f.down));
            let (g, d): (&[u128], &[u128]) = if f.transposed {
                (&[e, h, 2 * i], &[e, i, h])
            } else {
                (&[e, 2 * i, h], &[e, h, i])
            };
            prop_assert!(
                shape_is(gate_up.shape, g) && shape_is(down.shape, d),
                "{} detected as {} with E={} H={} I={}, but its tensors are {:?} and {:?}",
                layer.prefix,
                layer.format(),
                e,
                h,
                i,
                gate_up.shape,
                down.shape
            );
            check_dtype(&f.gate_up, layer.dtype)?;
            check_dtype(&f.down, layer.dtype)?;
            let biases = match (&f.gate_up_bias, &f.down_bias) {
                (Some(gb), Some(db)) => {
                    let (gb_s, db_s) = (stored(gb), stored(db));
                    prop_assert!(
                        shape_is(gb_s.shape, &[e, 2 * i]) && shape_is(db_s.shape, &[e, h]),
                        "{}: biases {:?} {:?} with E={} H={} I={}",
                        layer.prefix,
                        gb_s.shape,
                        db_s.shape,
                        e,
                        h,
                        i
                    );
                    let bias_dtype = layer.bias_dtype.expect("a group with biases");
                    check_dtype(gb, bias_dtype)?;
                    check_dtype(db, bias_dtype)?;
                    Some((gb_s, db_s))
                }
                (None, None) => None,
                _ => return Err(TestCaseError::fail("only one fused bias")),
            };
            prop_assert_eq!(biases.is_some(), layer.has_bias());
            Def::Fused {
                gate_up,
                down,
                biases,
                transposed: f.transposed,
                interleaved: f.interleaved,
            }
        }
        ExpertTensors::PerExpert(p) => {
            let list = |names: &'a [String], want: &[u128], dtype: Dtype| {
                prop_assert_eq!(names.len() as u128, e, "{}: experts", layer.prefix);
                names
                    .iter()
                    .map(|n| {
                        let s = stored(n);
                        prop_assert!(shape_is(s.shape, want), "{}: {:?}", n, s.shape);
                        check_dtype(n, dtype)?;
                        Ok(s)
                    })
                    .collect::<Result<Vec<_>, TestCaseError>>()
            };
            let weights = [
                list(&p.weights[0], &[i, h], layer.dtype)?,
                list(&p.weights[1], &[i, h], layer.dtype)?,
                list(&p.weights[2], &[h, i], layer.dtype)?,
            ];
            let biases = match &p.biases {
                Some(b) => {
                    let dtype = layer.bias_dtype.expect("a group with biases");
                    Some([
                        list(&b[0], &[i], dtype)?,
                        list(&b[1], &[i], dtype)?,
                        list(&b[2], &[h], dtype)?,
                    ])
                }
                None => None,
            };
            Def::PerExpert { weights, biases }
        }
    })
}

/// Opens what is at `path` and, if it opens, detects its groups and loads a few requests,
/// checking every outcome.
fn exercise(
    path: &Path,
    root: &Path,
    file_len: u64,
    seed: u64,
    reached: &Reached,
) -> Result<(), TestCaseError> {
    // Generous bound for "proportional to the file": the parse tree, names and a few plans.
    let limit = (16 << 20) + 64 * file_len as usize;
    let (opened, largest) = largest_allocation(|| Checkpoint::open(path));
    prop_assert!(largest <= limit, "open allocated {} bytes at once", largest);
    let ckpt = match opened {
        Ok(ckpt) => ckpt,
        Err(err) => {
            Reached::add(&reached.open_errors, 1);
            let message = err.to_string();
            let reason = message.rsplit(".safetensors: ").next().unwrap_or_default();
            // Tensor names and numbers vary: keep the words of the sentence.
            let words: Vec<&str> = reason
                .split_whitespace()
                .filter(|w| !w.contains('`') && !w.contains(|c: char| c.is_ascii_digit()))
                .take(7)
                .collect();
            let mut refusals = reached.refusals.lock().unwrap_or_else(|p| p.into_inner());
            *refusals.entry(words.join(" ")).or_default() += 1;
            return check_error(&err, root);
        }
    };
    Reached::add(&reached.opened, 1);
    exercise_opened(&ckpt, root, limit, seed, reached)
}

/// Plans one request and, if it is valid, checks the plan against the reference; an invalid
/// one must be refused with a typed error.
#[allow(clippy::too_many_arguments)]
fn check_request(
    ckpt: &Checkpoint,
    layer: &MoeLayer,
    def: &Def,
    target: Target,
    request: &LoadRequest,
    root: &Path,
    limit: usize,
    reached: &Reached,
) -> Result<(), TestCaseError> {
    let is_bias = matches!(target, Target::W13Bias | Target::W2Bias);
    let valid = layer.intermediate_size.is_multiple_of(request.tp_size)
        && request.experts.iter().all(|&x| x < layer.num_experts)
        && (!is_bias || layer.has_bias());
    let (plan, largest) = largest_allocation(|| CopyPlan::new(ckpt, layer, target, request));
    prop_assert!(largest <= limit, "plan allocated {} bytes at once", largest);
    let what = format!("{} {target:?} {request:?}", layer.prefix);
    let plan = match plan {
        Ok(plan) => plan,
        Err(err) => {
            Reached::add(&reached.plan_errors, 1);
            check_error(&err, root)?;
            prop_assert!(!valid, "{}: valid request refused: {}", what, err);
            return Ok(());
        }
    };
    prop_assert!(valid, "{}: invalid request planned", what);
    if plan.len() > 32 << 20 {
        return Ok(());
    }
    let expected = reference(def, layer, target, request);
    check_execution(ckpt, &plan, &expected, 1 << 20, 3, &what)?;
    Reached::add(&reached.plans_run, 1);
    Reached::add(&reached.bytes_compared, expected.len());
    Ok(())
}

fn exercise_opened(
    ckpt: &Checkpoint,
    root: &Path,
    limit: usize,
    seed: u64,
    reached: &Reached,
) -> Result<(), TestCaseError> {
    let files = Files::read(ckpt);
    for interleaved in [None, Some(true), Some(false)] {
        let (layers, largest) = largest_allocation(|| detect(ckpt, interleaved));
        prop_assert!(
            largest <= limit,
            "detect allocated {} bytes at once",
            largest
        );
        let layers = match layers {
            Ok(layers) => layers,
            Err(err) => {
                Reached::add(&reached.detect_errors, 1);
                check_error(&err, root)?;
                continue;
            }
        };
        Reached::add(&reached.groups, layers.len());
        for layer in &layers {
            let def = definition(ckpt, &files, layer)?;
            let e = layer.num_experts;
            let lists: Vec<Vec<usize>> = vec![
                vec![],
                vec![0],
                vec![e.wrapping_sub(1), 0, e.wrapping_sub(1)],
                vec![e],
                (0..e.min(5)).collect(),
                vec![(seed as usize) % e.max(1)],
            ];
            for tp_size in [1, 2, 3, 4] {
                let tp_rank = (seed as usize) % tp_size;
                for experts in &lists {
                    let request = LoadRequest {
                        tp_rank,
                        tp_size,
                        experts,
                        shard: None,
                    };
                    for target in [Target::W13, Target::W2, Target::W13Bias, Target::W2Bias] {
                        check_request(ckpt, layer, &def, target, &request, root, limit, reached)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Any bytes at all, raw or behind a plausible length prefix.
#[test]
fn arbitrary_bytes_open_or_fail_cleanly() {
    let strategy = (prop::collection::vec(any::<u8>(), 0..300), any::<bool>());
    let reached = fuzz(
        "arbitrary bytes",
        192,
        strategy,
        |(raw, prefixed), reached| {
            let dir = TempDir::new("fuzz-bytes");
            let path = dir.path().join("model.safetensors");
            let mut bytes = Vec::new();
            if prefixed {
                bytes.extend_from_slice(&(raw.len() as u64).to_le_bytes());
            }
            bytes.extend_from_slice(&raw);
            std::fs::write(&path, &bytes).unwrap();
            exercise(&path, dir.path(), bytes.len() as u64, 7, reached)
        },
    );
    assert!(Reached::get(&reached.open_errors) > 0);
}

/// Structurally valid headers of expert groups with mutated dtypes, shapes, offsets,
/// lengths, truncations and bit flips.
#[test]
fn mutated_headers_open_or_fail_cleanly() {
    let reached = fuzz("mutated headers", 384, hostile_file(), |file, reached| {
        let dir = TempDir::new("fuzz-hdr");
        let path = dir.path().join("model.safetensors");
        let bytes = file.bytes();
        std::fs::write(&path, &bytes).unwrap();
        exercise(&path, dir.path(), bytes.len() as u64, file.seed, reached)
    });
    // The generator must reach every stage, not only the header parser's refusals (checked
    // where there are enough cases for the fractions to mean something).
    let cases = Reached::get(&reached.cases);
    if cases >= 100 {
        assert!(
            Reached::get(&reached.open_errors) * 10 > cases,
            "{reached:?}"
        );
        assert!(Reached::get(&reached.opened) * 5 > cases, "{reached:?}");
        assert!(Reached::get(&reached.groups) * 20 > cases, "{reached:?}");
        assert!(Reached::get(&reached.plans_run) > 0, "{reached:?}");
    }
}

/// An index and a config of arbitrary (mostly plausible) contents beside two valid shards.
#[derive(Debug, Clone)]
struct HostileDir {
    index: Option<Vec<(String, String)>>,
    index_raw: Option<Vec<u8>>,
    config: Option<Vec<u8>>,
}

fn hostile_dir() -> impl Strategy<Value = HostileDir> {
    let tensor = prop::sample::select(vec![
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.other",
        "",
    ]);
    let file = prop::sample::select(vec![
        "a.safetensors",
        "b.safetensors",
        "missing.safetensors",
        "../a.safetensors",
        "/etc/passwd",
        "sub/a.safetensors",
        ".",
        "",
    ]);
    let config = prop_oneof![
        Just(br#"{"model_type": "gpt_oss"}"#.to_vec()),
        Just(br#"{"text_config": {"model_type": "gpt_oss"}}"#.to_vec()),
        Just(br#"{"model_type": 5}"#.to_vec()),
        Just(b"[1, 2]".to_vec()),
        Just(b"null".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    (
        prop::option::of(prop::collection::vec((tensor, file), 0..4)),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        prop::option::of(config),
    )
        .prop_map(|(index, index_raw, config)| HostileDir {
            index: index.map(|v| {
                v.into_iter()
                    .map(|(t, f)| (t.to_string(), f.to_string()))
                    .collect()
            }),
            index_raw,
            config,
        })
}

/// Directories with hostile indexes and configs: a typed error naming a file of the
/// checkpoint, or a checkpoint that loads correctly.
#[test]
fn hostile_indexes_and_configs_open_or_fail_cleanly() {
    let strategy = (hostile_dir(), any::<u64>());
    let reached = fuzz(
        "indexes and configs",
        96,
        strategy,
        |(spec, seed), reached| {
            let dir = TempDir::new("fuzz-dir");
            let layer = small_fused(seed);
            write(&dir.path().join("a.safetensors"), &layer[..1]);
            write(&dir.path().join("b.safetensors"), &layer[1..]);
            if let Some(index) = &spec.index {
                let map: serde_json::Map<String, serde_json::Value> = index
                    .iter()
                    .map(|(t, f)| (t.clone(), f.as_str().into()))
                    .collect();
                let text = serde_json::json!({"metadata": {}, "weight_map": map});
                std::fs::write(
                    dir.path().join("model.safetensors.index.json"),
                    text.to_string(),
                )
                .unwrap();
            } else if let Some(raw) = &spec.index_raw {
                std::fs::write(dir.path().join("model.safetensors.index.json"), raw).unwrap();
            }
            if let Some(config) = &spec.config {
                std::fs::write(dir.path().join("config.json"), config).unwrap();
            }
            exercise(dir.path(), dir.path(), 4096, seed, reached)
        },
    );
    if Reached::get(&reached.cases) >= 50 {
        assert!(Reached::get(&reached.open_errors) > 0, "{reached:?}");
        assert!(Reached::get(&reached.plans_run) > 0, "{reached:?}");
    }
}

/// A fused bf16 group `[3, 8, 6]` + `[3, 6, 4]` of random values.
fn small_fused(seed: u64) -> Vec<Tensor> {
    let p = "model.layers.0.mlp.experts";
    vec![
        Tensor {
            name: format!("{p}.gate_up_proj"),
            dtype: Dtype::BF16,
            shape: vec![3, 8, 6],
            data: random_bytes(seed, 3 * 8 * 6 * 2),
        },
        Tensor {
            name: format!("{p}.down_proj"),
            dtype: Dtype::BF16,
            shape: vec![3, 6, 4],
            data: random_bytes(seed ^ 1, 3 * 6 * 4 * 2),
        },
    ]
}

/// A header that claims far more than the file holds is refused without allocating for it,
/// and a sparse file of 384 GiB (all holes) opens, is detected and loads one rank's small
/// shard with small allocations only.
#[test]
fn huge_claims_do_not_allocate() {
    let dir = TempDir::new("fuzz-huge");
    let path = dir.path().join("model.safetensors");
    let p = "model.layers.0.mlp.experts";
    let claims = [
        vec![1u64 << 30, 1 << 30],
        vec![1 << 60],
        vec![1 << 20, 1 << 20, 1 << 20],
    ];
    for shape in claims {
        let elements: u128 = shape.iter().map(|&d| u128::from(d)).product();
        let end = u64::try_from(elements * 4).unwrap_or(u64::MAX);
        let header = serde_json::json!({
            format!("{p}.gate_up_proj"): {"dtype": "F32", "shape": shape, "data_offsets": [0, end]},
        })
        .to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(&path, &bytes).unwrap();
        let (result, largest) = largest_allocation(|| Checkpoint::open(&path));
        assert!(
            matches!(result, Err(Error::Header { .. })),
            "{shape:?}: {result:?}"
        );
        assert!(
            largest < 1 << 20,
            "{shape:?}: allocated {largest} bytes at once"
        );
    }

    // E=256, H=65536, I=4096 in bf16: gate_up 256 GiB, down 128 GiB, all holes.
    let (e, h, i) = (256usize, 65536usize, 4096usize);
    let gate_up = (e * 2 * i * h * 2) as u64;
    let down = (e * h * i * 2) as u64;
    let header = serde_json::json!({
        format!("{p}.gate_up_proj"): {"dtype": "BF16", "shape": [e, 2 * i, h], "data_offsets": [0, gate_up]},
        format!("{p}.down_proj"): {"dtype": "BF16", "shape": [e, h, i], "data_offsets": [gate_up, gate_up + down]},
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(bytes.len() as u64 + gate_up + down).unwrap();
    drop(file);

    let (ckpt, largest) = largest_allocation(|| Checkpoint::open(&path));
    let ckpt = ckpt.unwrap();
    assert!(largest < 1 << 20, "open allocated {largest} bytes at once");
    let (layers, largest) = largest_allocation(|| detect(&ckpt, None));
    let layers = layers.unwrap();
    assert!(
        largest < 1 << 20,
        "detect allocated {largest} bytes at once"
    );
    assert_eq!(
        (
            layers[0].num_experts,
            layers[0].hidden_size,
            layers[0].intermediate_size
        ),
        (e, h, i)
    );
    // The last EP rank of 64 (4 experts) at TP rank 1023 of 1024: 4 rows of gate and of up.
    let experts = [252, 253, 254, 255];
    let request = LoadRequest {
        tp_rank: 1023,
        tp_size: 1024,
        experts: &experts,
        shard: None,
    };
    for (target, bytes) in [
        (Target::W13, 4 * 2 * 4 * h * 2),
        (Target::W2, 4 * h * 4 * 2),
    ] {
        let (plan, largest) =
            largest_allocation(|| CopyPlan::new(&ckpt, &layers[0], target, &request));
        let plan = plan.unwrap();
        assert!(largest < 1 << 20, "plan allocated {largest} bytes at once");
        assert_eq!(plan.len(), bytes);
        for (_, executor) in executors() {
            let mut out = vec![0xFFu8; plan.len()];
            // SAFETY: `out` is `plan.len()` bytes, exclusively ours for the call.
            unsafe { executor.run(ckpt.shards(), plan.ops(), out.as_mut_ptr(), 0, out.len()) }
                .unwrap();
            assert!(out.iter().all(|&b| b == 0), "holes read as zeros");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Plans on random valid layouts against the reference

#[derive(Debug, Clone, Copy)]
enum Layout {
    /// `gate_up_proj`/`down_proj` (or GraniteMoe's `input_linear`/`output_linear`).
    Fused {
        transposed: bool,
        interleaved: bool,
        granite: bool,
        /// Interleaving from `config.json`'s `model_type` rather than the override.
        from_config: bool,
    },
    PerExpert {
        naming: usize,
    },
}

#[derive(Debug, Clone)]
struct LoadCase {
    layout: Layout,
    biases: bool,
    prefix: &'static str,
    experts: usize,
    hidden: usize,
    inter: usize,
    dtype: Dtype,
    bias_dtype: Dtype,
    tp_size: usize,
    tp_rank: usize,
    local: Vec<usize>,
    window: usize,
    misalign: usize,
    shards: usize,
    index: bool,
    open_dir: bool,
    decoys: bool,
    seed: u64,
}

/// Unquantized dtypes: float8 weights need scales (tests/quant.rs).
fn dtype_of_size(elem: usize) -> impl Strategy<Value = Dtype> {
    prop::sample::select(match elem {
        1 => vec![Dtype::U8, Dtype::I8, Dtype::BOOL, Dtype::F8_E8M0],
        2 => vec![Dtype::BF16, Dtype::F16, Dtype::I16, Dtype::U16],
        4 => vec![Dtype::F32, Dtype::I32, Dtype::U32],
        _ => vec![Dtype::F64, Dtype::I64, Dtype::U64, Dtype::C64],
    })
}

/// `(elem, E, H, tp_size, I / tp_size)`: mostly small; sometimes large enough for several
/// 1 MiB operations and windows; sometimes rows longer than one operation.
fn sizes() -> impl Strategy<Value = (usize, usize, usize, usize, usize)> {
    let elem = prop::sample::select(vec![1usize, 2, 4, 8]);
    let tp = prop::sample::select(vec![1usize, 2, 3, 4, 8]);
    prop_oneof![
        12 => (elem.clone(), 1usize..=8, 1usize..=40, tp.clone(), 1usize..=10),
        2 => (elem, 1usize..=4, 64usize..=320, prop::sample::select(vec![1usize, 2, 4]), 8usize..=40),
        1 => (
            prop::sample::select(vec![4usize, 8]),
            1usize..=2,
            1usize..=3000,
            prop::sample::select(vec![1usize, 2]),
            Just(1usize),
        )
            .prop_map(|(elem, e, extra, tp, k)| (elem, e, OP_BYTES / elem + extra, tp, k)),
    ]
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        3 => (any::<bool>(), any::<bool>(), prop::bool::weighted(0.2), any::<bool>()).prop_map(
            |(transposed, interleaved, granite, from_config)| Layout::Fused {
                transposed,
                interleaved,
                granite,
                from_config,
            }
        ),
        1 => (0usize..3).prop_map(|naming| Layout::PerExpert { naming }),
    ]
}

fn load_case() -> impl Strategy<Value = LoadCase> {
    (sizes(), layout(), any::<bool>(), 1usize..=8)
        .prop_flat_map(|((elem, e, h, tp, k), layout, biases, bias_elem)| {
            let granite = matches!(layout, Layout::Fused { granite: true, .. });
            // Per-expert layouts hold 3 or 6 tensors per expert: keep those small.
            let big = e * 2 * tp * k * h * elem > 1 << 20;
            let per_expert_too_big = matches!(layout, Layout::PerExpert { .. }) && big;
            let bias_elem = [1, 2, 4, 8][bias_elem % 4];
            (
                Just(layout),
                Just(biases && !granite && !per_expert_too_big),
                prop::sample::select(vec![
                    "model.layers.0.mlp.experts",
                    "model.layers.7.block_sparse_moe.experts",
                    "model.language_model.layers.12.feed_forward.experts",
                ]),
                Just((e, h, tp, k)),
                dtype_of_size(elem),
                dtype_of_size(bias_elem),
                0..tp,
                prop::collection::vec(0..e, 0..=2 * e),
                prop_oneof![3 => (1usize << 20)..(6 << 20), 1 => 1usize..(64 << 10)],
                0usize..16,
                (1usize..=3, any::<bool>(), any::<bool>(), any::<bool>()),
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                layout,
                biases,
                prefix,
                (e, h, tp, k),
                dtype,
                bias_dtype,
                tp_rank,
                local,
                window,
                misalign,
                (shards, index, open_dir, decoys),
                seed,
            )| LoadCase {
                layout,
                biases,
                prefix,
                experts: e,
                hidden: h,
                inter: tp * k,
                dtype,
                bias_dtype,
                tp_size: tp,
                tp_rank,
                local,
                window,
                misalign,
                shards,
                index,
                open_dir,
                decoys,
                seed,
            },
        )
}

const NAMINGS: [[&str; 3]; 3] = [
    ["gate_proj", "up_proj", "down_proj"],
    ["w1", "w3", "w2"],
    ["linear", "linear_v", "linear_1"],
];

impl LoadCase {
    fn format(&self) -> &'static str {
        match self.layout {
            Layout::PerExpert { .. } => "per_expert",
            Layout::Fused {
                transposed,
                interleaved,
                ..
            } => match (transposed, interleaved) {
                (false, false) => "fused",
                (true, false) => "fused_transposed",
                (false, true) => "fused_interleaved",
                (true, true) => "fused_transposed_interleaved",
            },
        }
    }

    /// The group's tensors, random bytes each, named and shaped by the layout's definition.
    fn tensors(&self) -> Vec<Tensor> {
        let (e, h, i, p) = (self.experts, self.hidden, self.inter, self.prefix);
        let mut seed = self.seed;
        let mut tensor = |name: String, dtype: Dtype, shape: Vec<usize>| {
            seed = seed.wrapping_add(1);
            let len = shape.iter().product::<usize>() * (dtype.bitsize() / 8);
            Tensor {
                name,
                dtype,
                shape,
                data: random_bytes(seed, len),
            }
        };
        let mut out = Vec::new();
        match self.layout {
            Layout::Fused {
                transposed,
                granite,
                ..
            } => {
                let (gu, d) = if granite {
                    ("input_linear.weight", "output_linear.weight")
                } else {
                    ("gate_up_proj", "down_proj")
                };
                let (gu_shape, d_shape) = if transposed {
                    (vec![e, h, 2 * i], vec![e, i, h])
                } else {
                    (vec![e, 2 * i, h], vec![e, h, i])
                };
                out.push(tensor(format!("{p}.{gu}"), self.dtype, gu_shape));
                out.push(tensor(format!("{p}.{d}"), self.dtype, d_shape));
                if self.biases {
                    out.push(tensor(
                        format!("{p}.{gu}_bias"),
                        self.bias_dtype,
                        vec![e, 2 * i],
                    ));
                    out.push(tensor(format!("{p}.{d}_bias"), self.bias_dtype, vec![e, h]));
                }
            }
            Layout::PerExpert { naming } => {
                let [g, u, d] = NAMINGS[naming];
                for x in 0..e {
                    out.push(tensor(
                        format!("{p}.{x}.{g}.weight"),
                        self.dtype,
                        vec![i, h],
                    ));
                    out.push(tensor(
                        format!("{p}.{x}.{u}.weight"),
                        self.dtype,
                        vec![i, h],
                    ));
                    out.push(tensor(
                        format!("{p}.{x}.{d}.weight"),
                        self.dtype,
                        vec![h, i],
                    ));
                    if self.biases {
                        out.push(tensor(
                            format!("{p}.{x}.{g}.bias"),
                            self.bias_dtype,
                            vec![i],
                        ));
                        out.push(tensor(
                            format!("{p}.{x}.{u}.bias"),
                            self.bias_dtype,
                            vec![i],
                        ));
                        out.push(tensor(
                            format!("{p}.{x}.{d}.bias"),
                            self.bias_dtype,
                            vec![h],
                        ));
                    }
                }
            }
        }
        if self.decoys {
            // Dense weights that look like experts but are not routed experts.
            let layer = p.rsplit_once('.').map_or(p, |(l, _)| l);
            out.push(tensor(
                format!("{layer}.gate_up_proj.weight"),
                Dtype::BF16,
                vec![4, 3],
            ));
            for m in ["gate_proj", "up_proj", "down_proj"] {
                out.push(tensor(
                    format!("{layer}.shared_experts.0.{m}.weight"),
                    Dtype::F32,
                    vec![2, 2],
                ));
            }
        }
        out
    }

    /// The reference definition over the generated tensors (not over what the core parsed).
    fn definition<'a>(&self, tensors: &'a [Tensor]) -> Def<'a> {
        let by_name = |name: String| {
            let t = tensors
                .iter()
                .find(|t| t.name == name)
                .expect("a generated tensor");
            Stored {
                name: &t.name,
                shape: &t.shape,
                elem: t.dtype.bitsize() / 8,
                bytes: &t.data,
            }
        };
        let p = self.prefix;
        match self.layout {
            Layout::Fused {
                transposed,
                interleaved,
                granite,
                ..
            } => {
                let (gu, d) = if granite {
                    ("input_linear.weight", "output_linear.weight")
                } else {
                    ("gate_up_proj", "down_proj")
                };
                Def::Fused {
                    gate_up: by_name(format!("{p}.{gu}")),
                    down: by_name(format!("{p}.{d}")),
                    biases: self.biases.then(|| {
                        (
                            by_name(format!("{p}.{gu}_bias")),
                            by_name(format!("{p}.{d}_bias")),
                        )
                    }),
                    transposed,
                    interleaved,
                }
            }
            Layout::PerExpert { naming } => {
                let names = NAMINGS[naming];
                let list = |k: usize, kind: &str| {
                    (0..self.experts)
                        .map(|x| by_name(format!("{p}.{x}.{}.{kind}", names[k])))
                        .collect::<Vec<_>>()
                };
                Def::PerExpert {
                    weights: [list(0, "weight"), list(1, "weight"), list(2, "weight")],
                    biases: self
                        .biases
                        .then(|| [list(0, "bias"), list(1, "bias"), list(2, "bias")]),
                }
            }
        }
    }

    /// Writes the checkpoint: one file, or several shards with or without an index; a
    /// `config.json` where interleaving comes from `model_type`. Returns the path to open.
    fn write(&self, dir: &Path, tensors: &[Tensor]) -> PathBuf {
        if let Layout::Fused {
            interleaved,
            from_config: true,
            ..
        } = self.layout
        {
            let model_type = if interleaved { "gpt_oss" } else { "qwen3_moe" };
            std::fs::write(
                dir.join("config.json"),
                format!(r#"{{"model_type": "{model_type}"}}"#),
            )
            .unwrap();
        }
        if self.shards == 1 {
            let path = dir.join("model.safetensors");
            write(&path, tensors);
            return if self.open_dir {
                dir.to_path_buf()
            } else {
                path
            };
        }
        let n = self.shards;
        let mut files: Vec<Vec<Tensor>> = (0..n).map(|_| Vec::new()).collect();
        let mut weight_map = serde_json::Map::new();
        for (k, t) in tensors.iter().enumerate() {
            let s = (k + self.seed as usize) % n;
            let name = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
            weight_map.insert(t.name.clone(), name.into());
            files[s].push(Tensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.data.clone(),
            });
        }
        for (s, f) in files.iter().enumerate() {
            write(
                &dir.join(format!("model-{:05}-of-{n:05}.safetensors", s + 1)),
                f,
            );
        }
        if self.index {
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        dir.to_path_buf()
    }

    fn interleaved_override(&self) -> Option<bool> {
        match self.layout {
            Layout::Fused {
                from_config: true, ..
            }
            | Layout::PerExpert { .. } => None,
            Layout::Fused {
                interleaved: false, ..
            } if self.seed.is_multiple_of(2) => None,
            Layout::Fused { interleaved, .. } => Some(interleaved),
        }
    }
}

proptest! {
    #![proptest_config(cases(96))]

    /// Every plan of a random valid layout, executed whole and by windows, in both read modes,
    /// fills exactly the bytes the layout's definition gives for the rank and its experts.
    #[test]
    fn plans_fill_what_the_layout_defines(case in load_case()) {
        let dir = TempDir::new("fuzz-plan");
        let tensors = case.tensors();
        let path = case.write(dir.path(), &tensors);
        let ckpt = Checkpoint::open(&path).unwrap();
        let layers = detect(&ckpt, case.interleaved_override()).unwrap();
        prop_assert_eq!(layers.len(), 1, "{:?}", layers);
        let layer = &layers[0];
        prop_assert_eq!(layer.prefix.as_str(), case.prefix);
        prop_assert_eq!(layer.format(), case.format());
        prop_assert_eq!(
            (layer.num_experts, layer.hidden_size, layer.intermediate_size),
            (case.experts, case.hidden, case.inter)
        );
        prop_assert_eq!(layer.dtype, case.dtype);
        prop_assert_eq!(layer.bias_dtype, case.biases.then_some(case.bias_dtype));

        let def = case.definition(&tensors);
        let request = LoadRequest {
            tp_rank: case.tp_rank,
            tp_size: case.tp_size,
            experts: &case.local,
            shard: None,
        };
        for target in [Target::W13, Target::W2, Target::W13Bias, Target::W2Bias] {
            let plan = CopyPlan::new(&ckpt, layer, target, &request);
            if matches!(target, Target::W13Bias | Target::W2Bias) && !case.biases {
                prop_assert!(matches!(plan, Err(Error::Request { .. })), "{:?}", plan);
                continue;
            }
            let plan = plan.unwrap();
            // A rank reads only the bytes it keeps: the plan's length is the destination's.
            let expected = reference(&def, layer, target, &request);
            let what = format!("{target:?}");
            check_execution(&ckpt, &plan, &expected, case.window, case.misalign, &what)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: minimal inputs found by the fuzzers above (bugs at commit a977852). Each says
// what went wrong; any answer that is a typed refusal or exact sizes passes.

/// A raw safetensors file from `(name, dtype, shape)` entries, with offsets computed from the
/// shapes and random data.
fn raw_file(path: &Path, entries: &[(&str, &str, &[u64])]) {
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for &(name, dtype, shape) in entries {
        let bits = bits_of(dtype).expect("a known dtype") as u64;
        let size = shape.iter().product::<u64>() * bits / 8;
        header.insert(
            name.into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}),
        );
        at += size;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend(random_bytes(1, at as usize));
    std::fs::write(path, bytes).unwrap();
}

/// Detection on a file, with any panic turned into a message.
fn detect_without_panic(
    ckpt: &Checkpoint,
    interleaved: Option<bool>,
) -> Result<Vec<MoeLayer>, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| detect(ckpt, interleaved)))
        .map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("detect panicked: {message}")
        })
        .map(|layers| layers.unwrap_or_default())
}

const P: &str = "model.layers.0.mlp.experts";

/// The format admits any dimension beside a zero one, and `layout::fused_group` doubled
/// `down`'s last dimension unchecked (`2 * d[2]`): a debug build panicked with "attempt to
/// multiply with overflow"; a release build (the Python wheel) wrapped and reported a group
/// with `intermediate_size` 2^63 whose gate_up tensor has 0 rows.
#[test]
fn regression_zero_sized_tensor_with_huge_dimension() {
    let dir = TempDir::new("reg-huge-dim");
    let path = dir.path().join("model.safetensors");
    let gate_up = format!("{P}.gate_up_proj");
    let down = format!("{P}.down_proj");
    raw_file(
        &path,
        &[
            (&gate_up, "BF16", &[0, 0, 1]),
            (&down, "BF16", &[0, 1, 1 << 63]),
        ],
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let layers = detect_without_panic(&ckpt, None).unwrap();
    // Either no group, or one whose sizes are those of its tensors.
    for layer in &layers {
        let rows = 2 * layer.intermediate_size as u128;
        assert_eq!(
            rows, 0,
            "{layer:?} claims 2I = {rows} for a gate_up of 0 rows"
        );
    }
}

/// Same root: with `gate_up [1, 4, 0]`, `down [1, 0, 2^63 + 2]` and biases `[1, 4]`/`[1, 0]`,
/// a release build detected I = 2^63 + 2 (2I wraps to 4) and planned the interleaved
/// `w13_bias` as a gather of 2^63 + 2 columns whose end offset and length wrap to 8 bytes:
/// both bounds checks (`CopyPlan::push_matrix` and `Executor::run`) passed, and executing
/// the plan wrote far past its 8-byte destination (AddressSanitizer: heap-buffer-overflow
/// WRITE in `Executor::run`; SIGBUS from Python). Checked here without executing: every
/// operation's exact source extent and length must be what its wrapped fields say.
#[test]
fn regression_wrapped_bias_view_escapes_the_bounds_check() {
    let dir = TempDir::new("reg-wrap");
    let path = dir.path().join("model.safetensors");
    let names = [
        "gate_up_proj",
        "down_proj",
        "gate_up_proj_bias",
        "down_proj_bias",
    ]
    .map(|n| format!("{P}.{n}"));
    raw_file(
        &path,
        &[
            (&names[0], "BF16", &[1, 4, 0]),
            (&names[1], "BF16", &[1, 0, (1 << 63) + 2]),
            (&names[2], "BF16", &[1, 4]),
            (&names[3], "BF16", &[1, 0]),
        ],
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let layers = detect_without_panic(&ckpt, Some(true)).unwrap();
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0],
        shard: None,
    };
    for layer in &layers {
        let Ok(plan) = CopyPlan::new(&ckpt, layer, Target::W13Bias, &request) else {
            continue;
        };
        for op in plan.ops() {
            let (rows, cols, elem) = (op.rows as u128, op.cols as u128, op.elem as u128);
            let end = op.src as u128
                + (rows - 1) * op.src_row_stride as u128
                + (cols - 1) * op.src_col_stride as u128
                + elem;
            assert!(
                end <= ckpt.shards()[op.shard].len() as u128,
                "{op:?} reads up to byte {end} of a {}-byte file",
                ckpt.shards()[op.shard].len()
            );
            assert_eq!(
                rows * cols * elem,
                op.len() as u128,
                "{op:?}: wrapped length"
            );
        }
    }
}

/// Minor: a group with intermediate size 0 was detected, but planning its (empty)
/// interleaved w13 was refused with "a view reaches past the tensor's bytes" (a message that
/// names the tensor where it says "experts at"), because the up view of an empty tensor
/// starts one element in; likewise with H = 0 in the transposed interleaved layout, and for
/// the interleaved biases with I = 0. Either answer is right: refuse the empty group when it
/// is detected, or plan a valid request for it to nothing.
#[test]
fn regression_empty_view_of_empty_tensor_is_refused() {
    let dir = TempDir::new("reg-empty");
    let path = dir.path().join("model.safetensors");
    let gate_up = format!("{P}.gate_up_proj");
    let down = format!("{P}.down_proj");
    raw_file(
        &path,
        &[(&gate_up, "U8", &[1, 0, 1]), (&down, "U8", &[1, 1, 0])],
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let layers = match detect(&ckpt, Some(true)) {
        Ok(layers) => layers,
        Err(err) => {
            assert!(matches!(err, Error::Layout { .. }), "{err}");
            return;
        }
    };
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].intermediate_size, 0);
    let request = LoadRequest {
        tp_rank: 0,
        tp_size: 1,
        experts: &[0],
        shard: None,
    };
    let plan = CopyPlan::new(&ckpt, &layers[0], Target::W13, &request);
    assert!(plan.as_ref().is_ok_and(CopyPlan::is_empty), "{plan:?}");
}
