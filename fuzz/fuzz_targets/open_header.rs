//! The input becomes a safetensors file, which is opened with the core; if it opens, its
//! expert groups are detected and a few requests planned and executed. Crashes: any panic,
//! an operation whose exact source extent leaves its file, read modes that disagree, or a
//! windowed execution that differs from the whole one.
//!
//! The first byte chooses how the rest becomes a file: `0` as is (length field included);
//! `1` as `header 0xFF data`, with the length field written to match the header; `2` and `3`
//! as that, with the data section also sized to what the header describes. Byte-level
//! mutations of a header then stay valid files often enough to reach layouts and plans.
//!
//! Seeds: `fuzz/seeds/open_header` (valid checkpoints of every layout); crashes found so far:
//! `fuzz/regressions/open_header` (replay with `cargo +nightly fuzz run open_header
//! fuzz/regressions/open_header -- -runs=0`). Run with `cargo +nightly fuzz run open_header
//! fuzz/corpus/open_header fuzz/seeds/open_header -- -dict=fuzz/open_header.dict`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use fastmoe_load_core::{detect, Checkpoint, CopyPlan, Executor, LoadRequest, ReadMode, Target};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("fastmoe-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    })
}

fn executors() -> &'static [Executor; 2] {
    static EXECUTORS: OnceLock<[Executor; 2]> = OnceLock::new();
    EXECUTORS.get_or_init(|| {
        [
            Executor::new(2, ReadMode::Map),
            Executor::new(2, ReadMode::Read),
        ]
    })
}

fn run(ckpt: &Checkpoint, plan: &CopyPlan, executor: &Executor, window: usize) -> Vec<u8> {
    let mut out = vec![0x5Au8; plan.len()];
    for (start, end) in plan.windows(window) {
        let ops = plan
            .ops_in(start, end)
            .expect("windows end on operation boundaries");
        // SAFETY: `out[start..end]` is ours for the call.
        unsafe {
            executor.run(
                ckpt.shards(),
                ops,
                out[start..end].as_mut_ptr(),
                start,
                end - start,
            )
        }
        .expect("a plan of an intact file runs");
    }
    out
}

/// The file an input stands for (see the module comment).
fn file_of(input: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = input.split_first() else {
        return Vec::new();
    };
    if mode % 4 == 0 {
        return rest.to_vec();
    }
    let (header, data) = match rest.iter().position(|&b| b == 0xFF) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    if mode % 4 == 1 {
        file.extend_from_slice(data);
        return file;
    }
    // The end of the data the header describes, if it parses; at most 1 MiB.
    let described = serde_json::from_slice::<serde_json::Value>(header)
        .ok()
        .and_then(|v| {
            v.as_object()?
                .values()
                .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                .max()
        })
        .unwrap_or(0)
        .min(1 << 20) as usize;
    file.extend(
        (0..described).map(|k| data.get(k % data.len().max(1)).copied().unwrap_or(k as u8)),
    );
    file
}

fuzz_target!(|input: &[u8]| {
    let path = scratch().join("model.safetensors");
    std::fs::write(&path, file_of(input)).expect("the scratch file is writable");
    let ckpt = match Checkpoint::open(&path) {
        Ok(ckpt) => ckpt,
        Err(err) => {
            assert!(err.to_string().contains("model.safetensors"), "{err}");
            return;
        }
    };
    for interleaved in [None, Some(true)] {
        let Ok(layers) = detect(&ckpt, interleaved) else {
            continue;
        };
        for layer in &layers {
            let e = layer.num_experts;
            let lists = [
                vec![],
                vec![0],
                vec![e.saturating_sub(1), 0, e.saturating_sub(1)],
            ];
            for tp_size in [1, 2, 4] {
                for experts in &lists {
                    let request = LoadRequest {
                        tp_rank: tp_size - 1,
                        tp_size,
                        experts,
                    };
                    for target in [Target::W13, Target::W2, Target::W13Bias, Target::W2Bias] {
                        let Ok(plan) = CopyPlan::new(&ckpt, layer, target, &request) else {
                            continue;
                        };
                        for op in plan.ops() {
                            let exact = |x: usize| x as u128;
                            let end = exact(op.src)
                                + exact(op.rows - 1) * exact(op.src_row_stride)
                                + exact(op.cols - 1) * exact(op.src_col_stride)
                                + exact(op.elem);
                            assert!(end <= exact(ckpt.shards()[op.shard].len()), "{op:?}");
                            assert_eq!(
                                exact(op.rows) * exact(op.cols) * exact(op.elem),
                                exact(op.len()),
                                "{op:?}"
                            );
                        }
                        if plan.len() > 16 << 20 {
                            continue;
                        }
                        let [map, read] = executors();
                        let whole = run(&ckpt, &plan, map, usize::MAX);
                        assert!(whole == run(&ckpt, &plan, read, usize::MAX));
                        assert!(whole == run(&ckpt, &plan, map, 1 << 20));
                    }
                }
            }
        }
    }
});
