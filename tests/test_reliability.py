"""Reliability of the Python API on the CPU (no GPU needed): several threads on one checkpoint,
closing while views and plans live, forked children, leaks over thousands of opens and loads,
checkpoints larger than RAM, files that change under the mapping, and a hypothesis property over
generated headers, shapes, offsets and TP/EP requests.

Whatever could kill or hang the interpreter (a fork, a SIGBUS, the hypothesis search over hostile
files) runs in a child process with a timeout, so that it fails one test instead of pytest.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

TESTS_DIR = Path(__file__).resolve().parent
CHILD_TIMEOUT_S = 120


def prefix(layer: int, family: str = "mlp.experts") -> str:
    return f"model.layers.{layer}.{family}"


# ---------------------------------------------------------------------------------------------
# Helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that NaN, -0.0 and bools that are not 0 or 1 compare exactly
    (one-byte tensors are reinterpreted before any copy, which could normalise bools)."""
    if t.element_size() == 1:
        t = t.view(torch.uint8)
    # A fresh dense copy: `contiguous()` keeps odd strides on size-1 dimensions.
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return dense.view(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@dataclass
class Experts:
    """One layer's experts as the model sees them: gate/up `[E, I, H]`, down `[E, H, I]`."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def w13(self, experts: list[int], tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
        n = self.gate.shape[1] // tp_size
        rows = slice(tp_rank * n, (tp_rank + 1) * n)
        return torch.cat([self.gate[experts][:, rows], self.up[experts][:, rows]], dim=1)

    def w2(self, experts: list[int], tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
        n = self.down.shape[2] // tp_size
        return self.down[experts][:, :, tp_rank * n : (tp_rank + 1) * n]


def random_experts(e: int, h: int, i: int, seed: int) -> Experts:
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(e, i, h, generator=g).bfloat16() for _ in range(2))
    return Experts(gate, up, torch.randn(e, h, i, generator=g).bfloat16())


def stored(p: str, x: Experts, layout: str) -> dict[str, torch.Tensor]:
    """`x` as a checkpoint stores it: `fused` ([E, 2I, H] + [E, H, I]), `transposed`
    ([E, H, 2I] + [E, I, H]) or `per_expert` (Mixtral's w1/w3/w2)."""
    if layout == "per_expert":
        out = {}
        for e in range(x.gate.shape[0]):
            out[f"{p}.{e}.w1.weight"] = x.gate[e].clone()
            out[f"{p}.{e}.w3.weight"] = x.up[e].clone()
            out[f"{p}.{e}.w2.weight"] = x.down[e].clone()
        return out
    gate_up = torch.cat([x.gate, x.up], dim=1)
    if layout == "transposed":
        return {
            f"{p}.gate_up_proj": gate_up.transpose(1, 2).contiguous(),
            f"{p}.down_proj": x.down.transpose(1, 2).contiguous(),
        }
    return {f"{p}.gate_up_proj": gate_up, f"{p}.down_proj": x.down.clone()}


def load(
    ckpt: fml.Checkpoint,
    p: str,
    experts: list[int] | tuple[int, ...] | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    layer = ckpt.experts(p)
    ids = list(range(layer.num_experts)) if experts is None else list(experts)
    shard = layer.intermediate_size // tp_size
    h = layer.hidden_size
    w13 = torch.full((len(ids), 2 * shard, h), float("nan"), dtype=layer.dtype)
    w2 = torch.full((len(ids), h, shard), float("nan"), dtype=layer.dtype)
    fml.load_fused_moe(ckpt, p, w13, w2, tp_rank=tp_rank, tp_size=tp_size, local_experts=experts)
    return w13, w2


def run_python(code: str, *args: str, cwd: Path, timeout: float = CHILD_TIMEOUT_S):
    """Runs `code` in a fresh interpreter; a hang becomes a failure, not a stuck pytest."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"child hung for {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")


def describe(proc: subprocess.CompletedProcess) -> str:
    rc = proc.returncode
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
    return f"child {how}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A safetensors file whose data are holes: the header, then `truncate` to full size.
    Returns where the data section starts."""
    header, at = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"BF16": 2, "F32": 4}[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + at)
    return 8 + len(raw)


def process_state() -> dict[str, int]:
    """Open descriptors, mapping lines, threads and resident memory (kB) of this process, after
    handing freed heap memory back to the system (glibc keeps freed blocks of up to 32 MiB)."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    state = {
        "fds": len(os.listdir("/proc/self/fd")),
        "maps": len(Path("/proc/self/maps").read_text().splitlines()),
    }
    with open("/proc/self/status") as status:
        for line in status:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                state[key] = int(value.split()[0])
    return state


def settle(baseline: dict[str, int], timeout: float = 3.0) -> dict[str, int]:
    """The process state once copy threads of dropped checkpoints have exited."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = process_state()
        if now["Threads"] <= baseline["Threads"] or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# (1) Several threads, one checkpoint

LAYOUTS = ["fused", "fused", "transposed", "transposed", "per_expert", "fused"]
E, H, INTER = 8, 96, 128


@pytest.fixture(scope="module")
def multi_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Experts]]:
    """Six layers in three shards with an index: fused, transposed and per-expert."""
    root = tmp_path_factory.mktemp("multi")
    layers, weight_map = {}, {}
    for k, layout in enumerate(LAYOUTS):
        p = prefix(k, "block_sparse_moe.experts" if layout == "per_expert" else "mlp.experts")
        layers[p] = random_experts(E, H, INTER, seed=k)
        shard = f"model-{k % 3 + 1:05d}-of-00003.safetensors"
        tensors = stored(p, layers[p], layout)
        path = root / shard
        existing = {}
        if path.exists():
            existing = load_file(path)
        save_file({**existing, **tensors}, path)
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root, layers


def test_threads_loading_different_layers_get_the_bytes_of_one_thread(multi_layer):
    root, layers = multi_layer
    requests = [
        (p, experts, tp_rank, tp_size)
        for p in layers
        for experts, tp_rank, tp_size in [
            (None, 0, 1),
            ((7, 0, 3, 3), 1, 2),
            (tuple(fml.expert_placement(E, 3, 2, "round_robin")), 3, 4),
        ]
    ]
    with fml.open(root, num_threads=2) as ckpt:
        one_thread = {r: load(ckpt, r[0], r[1], r[2], r[3]) for r in requests}
    for (p, experts, tp_rank, tp_size), (w13, w2) in one_thread.items():
        ids = list(range(E)) if experts is None else list(experts)
        assert same_bytes(w13, layers[p].w13(ids, tp_rank, tp_size)), p
        assert same_bytes(w2, layers[p].w2(ids, tp_rank, tp_size)), p

    workers, rounds = 6, 8
    barrier = threading.Barrier(workers)
    failures: list[str] = []
    with fml.open(root, num_threads=2) as ckpt:

        def work(k: int) -> None:
            try:
                barrier.wait()
                ckpt.moe_layers()  # first detection races with the other threads'
                mine = requests[k::workers]
                for _ in range(rounds):
                    for r in mine:
                        w13, w2 = load(ckpt, r[0], r[1], r[2], r[3])
                        want13, want2 = one_thread[r]
                        if not (same_bytes(w13, want13) and same_bytes(w2, want2)):
                            failures.append(f"thread {k}: {r} differs")
                    view = ckpt.experts(mine[0][0]).w2(5)
                    if not same_bytes(view, layers[mine[0][0]].down[5]):
                        failures.append(f"thread {k}: view differs")
            except Exception as exc:
                failures.append(f"thread {k}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a loading thread hung"
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# (2) Closing while views and plans exist


def test_views_and_plans_outlive_close(multi_layer):
    root, layers = multi_layer
    p = prefix(0)
    ckpt = fml.open(root, num_threads=2)
    layer = ckpt.experts(p)
    whole = ckpt.tensor(f"{p}.gate_up_proj")
    gate, down = layer.w1(6), layer.w2(2)
    plan = ckpt._handle.plan(p, "w13", tp_rank=1, tp_size=2, experts=[2, 6])
    want = layers[p].w13([2, 6], 1, 2)

    ckpt.close()
    ckpt.close()  # a second close is harmless
    assert ckpt.closed
    gc.collect()
    assert same_bytes(gate, layers[p].gate[6])
    assert same_bytes(down, layers[p].down[2])
    assert same_bytes(whole[3, INTER:], layers[p].up[3])
    out = torch.empty_like(want)
    plan.execute(out.data_ptr())
    assert same_bytes(out, want)

    # The closed checkpoint refuses new work with a typed error and writes nothing.
    w13 = torch.full((E, 2 * INTER, H), float("nan"), dtype=torch.bfloat16)
    w2 = torch.full((E, H, INTER), float("nan"), dtype=torch.bfloat16)
    for attempt in (
        lambda: fml.load_fused_moe(ckpt, p, w13, w2),
        lambda: ckpt.tensor(f"{p}.down_proj"),
        lambda: layer.w3(0),
        lambda: ckpt.keys(),
    ):
        with pytest.raises(fml.FastMoeLoadError, match="closed"):
            attempt()
    assert w13.isnan().all() and w2.isnan().all()

    ckpt = layer = plan = None  # drop the last references to the checkpoint
    gc.collect()
    assert same_bytes(gate, layers[p].gate[6]), "a view must keep its mapping alive"


def test_close_while_other_threads_load(multi_layer):
    """Loads racing with `close` either finish with the right bytes or raise a typed error."""
    root, layers = multi_layer
    p = prefix(2)
    want13, want2 = layers[p].w13(list(range(E))), layers[p].w2(list(range(E)))
    outcomes: list[str] = []
    for _ in range(5):
        ckpt = fml.open(root, num_threads=2)
        started = threading.Barrier(4)

        def work(ckpt: fml.Checkpoint = ckpt, started: threading.Barrier = started) -> None:
            started.wait()
            for _ in range(5000):
                try:
                    w13, w2 = load(ckpt, p)
                except fml.FastMoeLoadError:
                    outcomes.append("refused")
                    return
                except Exception as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                    return
                ok = same_bytes(w13, want13) and same_bytes(w2, want2)
                outcomes.append("ok" if ok else "wrong bytes")

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.002)
        ckpt.close()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert set(outcomes) <= {"ok", "refused"}, sorted(set(outcomes))
    assert "refused" in outcomes


# ---------------------------------------------------------------------------------------------
# (3) Forked children

FORK_CHILD = r"""
import json, os, sys, time, traceback
import torch
import fastmoe_load as fml

root, p = sys.argv[1], sys.argv[2]

def load(ckpt):
    layer = ckpt.experts(p)
    n, i, h = layer.num_experts, layer.intermediate_size, layer.hidden_size
    w13 = torch.empty(n, 2 * i, h, dtype=layer.dtype)
    w2 = torch.empty(n, h, i, dtype=layer.dtype)
    fml.load_fused_moe(ckpt, p, w13, w2)
    return w13, w2

parent = fml.open(root, num_threads=2)
want13, want2 = load(parent)          # the parent's copy threads are running now

def same(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))

pid = os.fork()
if pid == 0:
    code = 3
    try:
        a13, a2 = load(parent)           # the checkpoint opened before the fork
        with fml.open(root, num_threads=2) as fresh:
            b13, b2 = load(fresh)
        ok = all(same(x, y) for x, y in [(a13, want13), (a2, want2), (b13, want13), (b2, want2)])
        code = 0 if ok else 5
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

deadline = time.monotonic() + 30
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print(json.dumps({"fork": "hung"}), flush=True)
        sys.exit(7)
    time.sleep(0.01)
print(json.dumps({"fork": os.waitstatus_to_exitcode(status)}), flush=True)

# DataLoader-style: worker processes forked from a parent that has used the module, each
# loading through the checkpoint it inherited.
class Layers(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, k):
        return load(parent)

loader = torch.utils.data.DataLoader(
    Layers(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=30
)
ok = all(same(w13, want13) and same(w2, want2) for w13, w2 in loader)
print(json.dumps({"dataloader": ok}), flush=True)
again13, again2 = load(parent)        # and the parent still works
print(json.dumps({"parent_after": same(again13, want13) and same(again2, want2)}), flush=True)
"""


def test_forked_children_can_open_and_load(multi_layer, tmp_path):
    root, _ = multi_layer
    proc = run_python(FORK_CHILD, str(root), prefix(3), cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, describe(proc)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    assert results == {"fork": 0, "dataloader": True, "parent_after": True}, describe(proc)


# ---------------------------------------------------------------------------------------------
# (4) Leaks


def test_no_leaks_over_thousands_of_opens_and_loads(tmp_path):
    p = prefix(0)
    x = random_experts(4, 8, 8, seed=1)
    path = tmp_path / "model.safetensors"
    save_file(stored(p, x, "fused"), path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-3])  # truncated download
    w13 = torch.empty(4, 16, 8, dtype=torch.bfloat16)
    w2 = torch.empty(4, 8, 8, dtype=torch.bfloat16)

    def cycle_with_threads() -> None:
        with fml.open(path, num_threads=2) as ckpt:
            fml.load_fused_moe(ckpt, p, w13, w2)

    for _ in range(100):  # warm up: allocator arenas of copy threads, torch caches
        cycle_with_threads()
    baseline = settle(process_state())
    start = time.perf_counter()

    for k in range(10_000):
        ckpt = fml.open(path)
        if k % 10 == 0:
            ckpt.moe_layers()
            view = ckpt.experts(p).w1(k % 4)
            del view
        ckpt.close()
    for _ in range(1_000):
        with pytest.raises(fml.HeaderError):
            fml.open(bad)
    with fml.open(path, num_threads=2) as ckpt:
        for _ in range(1_000):
            fml.load_fused_moe(ckpt, p, w13, w2)
        for _ in range(200):
            plan = ckpt._handle.plan(p, "w2", tp_rank=0, tp_size=1, experts=[3, 1])
            plan.execute(w2.data_ptr())
        del plan  # a plan keeps its checkpoint's files open, by design
    for _ in range(300):  # each checkpoint starts and stops its own copy threads
        cycle_with_threads()

    elapsed = time.perf_counter() - start
    after = settle(baseline)
    assert same_bytes(w13, x.w13(list(range(4))))
    assert after["fds"] == baseline["fds"], (baseline, after)
    assert after["Threads"] == baseline["Threads"], (baseline, after)
    assert after["maps"] <= baseline["maps"] + 8, (baseline, after)
    assert after["VmRSS"] <= baseline["VmRSS"] + 8 * 1024, (baseline, after)
    assert elapsed < 30, f"{elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------
# (5) A checkpoint larger than RAM, (6) a checkpoint of 100 shards


def test_sparse_checkpoint_larger_than_ram(tmp_path):
    """72 GiB of holes (12 layers of E=128, H=4096, I=2048 in bf16): opened, inspected and
    loaded per EP/TP rank into small destinations, with one expert of the last layer (at
    offsets beyond 64 GiB) written for real to check where the bytes come from."""
    n_layers, e, h, i = 12, 128, 4096, 2048
    tensors = {}
    for k in range(n_layers):
        tensors[f"{prefix(k)}.gate_up_proj"] = ("BF16", [e, 2 * i, h])
        tensors[f"{prefix(k)}.down_proj"] = ("BF16", [e, h, i])
    path = tmp_path / "model.safetensors"
    data_start = write_header_only(path, tensors)
    size = path.stat().st_size
    assert size > 64 * 2**30 and path.stat().st_blocks * 512 < 2**20

    # Expert 127 of the last layer, for real.
    last = prefix(n_layers - 1)
    x = random_experts(1, h, i, seed=5)
    gate_up_expert = torch.cat([x.gate[0], x.up[0]], dim=0).contiguous()
    expert_bytes = 2 * i * h * 2
    gate_up_at = data_start + (n_layers - 1) * 3 * e * i * h * 2
    down_at = gate_up_at + e * expert_bytes
    with open(path, "r+b") as f:
        os.pwrite(
            f.fileno(), bits(gate_up_expert).numpy().tobytes(), gate_up_at + 127 * expert_bytes
        )
        os.pwrite(f.fileno(), bits(x.down[0]).numpy().tobytes(), down_at + 127 * h * i * 2)
    assert down_at + 127 * h * i * 2 > 64 * 2**30

    before = process_state()
    with fml.open(path, num_threads=2) as ckpt:
        layers = ckpt.moe_layers()
        assert [(la.num_experts, la.hidden_size, la.intermediate_size) for la in layers] == [
            (e, h, i)
        ] * n_layers
        experts = fml.expert_placement(e, 32, 31)  # [124, 125, 126, 127]
        tp_rank, tp_size = 5, 8
        for layer in layers:
            w13, w2 = load(ckpt, layer.prefix, experts, tp_rank, tp_size)
            if layer.prefix == last:
                assert not w13[3].isnan().any()
                assert same_bytes(w13[3:], x.w13([0], tp_rank, tp_size))
                assert same_bytes(w2[3:], x.w2([0], tp_rank, tp_size))
                assert (bits(w13[:3]) == 0).all() and (bits(w2[:3]) == 0).all()
            else:
                assert (bits(w13) == 0).all() and (bits(w2) == 0).all()
        # Another rank, round-robin placement, read with pread.
        with fml.open(path, io="pread", num_threads=2) as pread:
            experts = fml.expert_placement(e, 32, 31, "round_robin")  # [31, 63, 95, 127]
            w13, w2 = load(pread, last, experts, 0, 8)
            assert same_bytes(w13[-1:], x.w13([0], 0, 8))
            assert same_bytes(w2[-1:], x.w2([0], 0, 8))
        after = process_state()
    # Anonymous memory: the destinations and little else. Mapped file pages: the pages the
    # rank's bytes lie in (strided down columns touch every page of their rows), ~1 GiB of
    # page cache here, against 72 GiB of checkpoint.
    assert after["RssAnon"] - before["RssAnon"] < 128 << 10, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 2 << 20, (before, after)


def test_opening_100_shards_reads_headers_only(tmp_path):
    """100 shards of 384 MiB of holes each (37.5 GiB) with an index: `open` and `moe_layers`
    touch the headers, not the data."""
    weight_map = {}
    e, h, i = 64, 2048, 512
    for k in range(100):
        shard = f"model-{k + 1:05d}-of-00100.safetensors"
        tensors = {
            f"{prefix(k)}.gate_up_proj": ("BF16", [e, 2 * i, h]),
            f"{prefix(k)}.down_proj": ("BF16", [e, h, i]),
        }
        write_header_only(tmp_path / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    gc.collect()
    before = process_state()
    start = time.perf_counter()
    ckpt = fml.open(tmp_path)
    layers = ckpt.moe_layers()
    elapsed = time.perf_counter() - start
    during = process_state()
    assert len(layers) == 100 and len(ckpt.shard_paths) == 100
    assert elapsed < 2.0, f"open + moe_layers of 100 shards took {elapsed:.2f} s"
    # A few pages per shard, never the data (384 MiB each).
    assert during["RssFile"] - before["RssFile"] < 16 << 10, (before, during)
    assert during["RssAnon"] - before["RssAnon"] < 32 << 10, (before, during)
    assert during["fds"] - before["fds"] == 100, (before, during)
    ckpt.close()
    gc.collect()
    after = process_state()
    assert after["fds"] == before["fds"] and after["maps"] <= before["maps"] + 2, (before, after)


# ---------------------------------------------------------------------------------------------
# (7) Files that change under the mapping

CHANGE_CHILD = r"""
import json, os, sys
import torch
import fastmoe_load as fml

p = sys.argv[1]
for path, change, io in json.loads(sys.argv[2]):
    ckpt = fml.open(path, io=io)
    layer = ckpt.experts(p)
    n, i, h = layer.num_experts, layer.intermediate_size, layer.hidden_size
    w13 = torch.full((n, 2 * i, h), float("nan"), dtype=layer.dtype)
    w2 = torch.full((n, h, i), float("nan"), dtype=layer.dtype)
    size = os.path.getsize(path)
    if change == "truncated":
        os.truncate(path, size // 2)
    elif change == "extended":
        os.truncate(path, size + 4096)
    elif change == "rewritten":
        with open(path, "r+b") as f:
            f.seek(size - 64)
            f.write(b"\x7f" * 64)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "replaced":
        with open(path, "rb") as f:
            data = f.read()
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)
    elif change == "deleted":
        os.unlink(path)
    record = {"case": f"{change}-{io}", "type": None, "message": None}
    try:
        fml.load_fused_moe(ckpt, p, w13, w2)
    except Exception as exc:
        record.update(type=type(exc).__name__, message=str(exc),
                      fastmoe=isinstance(exc, fml.FastMoeLoadError))
    record["untouched"] = bool(w13.isnan().all() and w2.isnan().all())
    print(json.dumps(record), flush=True)
"""
CHANGES = ["truncated", "extended", "rewritten", "replaced", "deleted"]


@pytest.fixture(scope="module")
def changed_after_open(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every change, under both read modes, in one child process (which a SIGBUS would
    kill): what `load_fused_moe` did after the shard changed."""
    root = tmp_path_factory.mktemp("changed")
    tensors = stored(prefix(0), random_experts(8, 64, 96, seed=2), "fused")
    cases = []
    for change in CHANGES:
        for io in ("mmap", "pread"):
            path = root / f"{change}-{io}" / "model.safetensors"
            path.parent.mkdir()
            save_file(tensors, path)
            cases.append((str(path), change, io))
    proc = run_python(CHANGE_CHILD, prefix(0), json.dumps(cases), cwd=root, timeout=90)
    records = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            path = root / record["case"] / "model.safetensors"
            records[record["case"]] = {**record, "path": str(path)}
    records["child"] = {"returncode": proc.returncode, "describe": describe(proc)}
    return records


@pytest.mark.parametrize("io", ["mmap", "pread"])
@pytest.mark.parametrize("change", CHANGES)
def test_file_changed_after_open_is_a_typed_error(changed_after_open, change, io):
    record = changed_after_open.get(f"{change}-{io}")
    assert record is not None, changed_after_open["child"]["describe"]
    assert record["type"] == "FileChangedError" and record["fastmoe"], record
    assert record["path"] in record["message"], record
    assert record["untouched"], record


MID_COPY_CHILD = r"""
import json, os, sys, threading, time
import torch
import fastmoe_load as fml

path, p, io, faulthandler_on, threads = sys.argv[1:6]
ckpt = fml.open(path, io=io, num_threads=int(threads))
layer = ckpt.experts(p)
n, i, h = layer.num_experts, layer.intermediate_size, layer.hidden_size
w13 = torch.full((n, 2 * i, h), float("nan"), dtype=layer.dtype)
w2 = torch.full((n, h, i), float("nan"), dtype=layer.dtype)
if faulthandler_on == "1":
    # Enabled after a first load installed the copy threads' handler: faulthandler's own
    # then runs first and re-raises, which must not end the process either.
    fml.load_fused_moe(ckpt, p, w13[:1], w2[:1], local_experts=[0])
    w13.fill_(float("nan")), w2.fill_(float("nan"))
    import faulthandler
    faulthandler.enable()

def cut():
    time.sleep(0.02)
    os.truncate(path, 4096)

thread = threading.Thread(target=cut)
thread.start()
record = {"type": None}
try:
    fml.load_fused_moe(ckpt, p, w13, w2)
except Exception as exc:
    record.update(type=type(exc).__name__, message=str(exc))
thread.join()
# The data are holes: copied bytes are zeros, untouched ones NaN.
record["written"] = bool(not w13.isnan().all() or not w2.isnan().all())
print(json.dumps(record), flush=True)
"""

MID_COPY_CASES = [
    pytest.param("pread", "fused", id="pread-contiguous"),
    pytest.param("mmap", "fused", id="mmap"),
    pytest.param("pread", "transposed", id="pread-strided"),
    pytest.param("mmap", "transposed", id="mmap-strided"),
    pytest.param("mmap", "fused-faulthandler", id="mmap-faulthandler-after"),
    pytest.param("mmap", "fused-4-threads", id="mmap-4-threads"),
]


@pytest.mark.parametrize(("io", "layout"), MID_COPY_CASES)
def test_truncation_during_the_copy_does_not_kill_the_process(tmp_path, io, layout):
    """A 768 MiB load (holes) with one copy thread (or four); the file is cut to 4 KiB 20 ms in. The
    process must survive, and the load fail with FileChangedError naming the file (runs in
    which the truncation missed the copy are skipped)."""
    p = prefix(0)
    e, h, i = 4, 8192, 4096
    path = tmp_path / "model.safetensors"
    if layout.startswith("fused"):
        shapes = {"gate_up_proj": [e, 2 * i, h], "down_proj": [e, h, i]}
    else:
        shapes = {"gate_up_proj": [e, h, 2 * i], "down_proj": [e, i, h]}
    write_header_only(path, {f"{p}.{k}": ("BF16", s) for k, s in shapes.items()})
    faulthandler_on = "1" if layout.endswith("faulthandler") else "0"
    threads = "4" if layout.endswith("threads") else "1"  # several threads meet the cut
    proc = run_python(
        MID_COPY_CHILD, str(path), p, io, faulthandler_on, threads, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0, describe(proc)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    if record["type"] is None:
        pytest.skip("the load finished before the truncation took effect; nothing was tested")
    if record["type"] == "FileChangedError" and not record["written"]:
        pytest.skip("the truncation came before the copy began; nothing was tested")
    assert record["type"] == "FileChangedError", record
    assert str(path) in record["message"], record


FOREIGN_SIGBUS_CHILD = r"""
import faulthandler, os, sys
import torch
import fastmoe_load as fml

path, p, order = sys.argv[1:4]
if order == "faulthandler-first":
    faulthandler.enable()
ckpt = fml.open(path)
layer = ckpt.experts(p)
w13 = torch.empty(layer.num_experts, 2 * layer.intermediate_size, layer.hidden_size,
                  dtype=layer.dtype)
w2 = torch.empty(layer.num_experts, layer.hidden_size, layer.intermediate_size,
                 dtype=layer.dtype)
fml.load_fused_moe(ckpt, p, w13, w2)  # installs the copy threads' SIGBUS handler
if order == "faulthandler-after":
    faulthandler.enable()
view = layer.w2(layer.num_experts - 1)  # a plain memory map: not guarded
os.truncate(path, 4096)
torch.set_num_threads(1)  # one faulting thread: faulthandler reports the first fault only
print("read", float(view.float().sum()), flush=True)
"""


@pytest.mark.parametrize("order", ["alone", "faulthandler-first", "faulthandler-after"])
def test_sigbus_outside_a_copy_still_ends_the_process(tmp_path, order):
    """The copy threads' handler passes on every SIGBUS that is not theirs: reading a view of
    a file truncated under it kills the process as it would without fastmoe_load, and
    Python's faulthandler, installed before or after, still reports it."""
    p = prefix(0)
    path = tmp_path / "model.safetensors"
    save_file(stored(p, random_experts(4, 256, 512, seed=5), "fused"), path)
    proc = run_python(FOREIGN_SIGBUS_CHILD, str(path), p, order, cwd=tmp_path)
    assert proc.returncode == -signal.SIGBUS, describe(proc)
    assert "read" not in proc.stdout, describe(proc)
    if order != "alone":
        assert "Bus error" in proc.stderr, describe(proc)


# ---------------------------------------------------------------------------------------------
# Regressions: bugs the fuzzers found (minimal reproductions; see rust/core/tests/fuzz_props.rs)


def write_raw(path: Path, entries: list[tuple[str, str, list[int]]]) -> None:
    """A safetensors file of `(name, dtype, shape)` entries whose data bytes count 1, 2, ..."""
    header, at = {}, 0
    for name, dtype, shape in entries:
        size = BITS[dtype] // 8
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes((k + 1) % 256 for k in range(at)))


def wrapped_bias_group(path: Path) -> str:
    """gate_up [1, 4, 0], down [1, 0, 2^63 + 2] and biases [1, 4], [1, 0]: legal (the weights
    hold no element), and I = 2^63 + 2 makes 2I wrap to 4 in the release build."""
    p = prefix(0)
    write_raw(
        path,
        [
            (f"{p}.gate_up_proj", "BF16", [1, 4, 0]),
            (f"{p}.down_proj", "BF16", [1, 0, 2**63 + 2]),
            (f"{p}.gate_up_proj_bias", "BF16", [1, 4]),
            (f"{p}.down_proj_bias", "BF16", [1, 0]),
        ],
    )
    return p


def test_group_with_a_huge_zero_sized_dimension(tmp_path):
    """Bug at a977852: unchecked `2 * d[2]` in layout detection wrapped; the group reported
    I = 2^63 + 2 for a gate_up of 4 rows, and its views raised TypeError from torch."""
    path = tmp_path / "model.safetensors"
    p = wrapped_bias_group(path)
    with fml.open(path, interleaved=True) as ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fml.UnsupportedWarning)
            layers = ckpt.moe_layers()
        if not layers:  # refusing the group is a fine answer, typed when it is used
            with pytest.raises(fml.FastMoeLoadError):
                ckpt.experts(p)
            return
        for layer in layers:
            assert 2 * layer.intermediate_size == 4, layer
            for view in (layer.w1, layer.b1, layer.w2):
                try:
                    view(0)
                except fml.FastMoeLoadError:
                    pass  # a typed refusal is fine; a TypeError is the bug
        assert ckpt.experts(p) is layers[0]


PLAN_CHILD = r"""
import sys, torch, fastmoe_load as fml
path, p = sys.argv[1:3]
ckpt = fml.open(path, interleaved=True)
try:
    plan = ckpt._handle.plan(p, "w13_bias", tp_rank=0, tp_size=1, experts=[0])
    out = torch.zeros(plan.nbytes + 4096, dtype=torch.uint8)
    plan.execute(out.data_ptr())
except fml.FastMoeLoadError as exc:
    print("refused:", exc)
print("survived", flush=True)
"""


def test_native_plan_of_a_wrapped_group_does_not_crash(tmp_path):
    """Bug at a977852: a plan of the wrapped group gathered 2^63 + 2 columns whose wrapped end
    passed the executor's bounds check; executing it read and wrote out of bounds (SIGBUS)."""
    path = tmp_path / "model.safetensors"
    p = wrapped_bias_group(path)
    proc = run_python(PLAN_CHILD, str(path), p, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "survived" in proc.stdout, describe(proc)


# ---------------------------------------------------------------------------------------------
# Hypothesis: generated files and requests against `fml.open` + `fml.load_fused_moe`

BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
}
HUGE = [2**31, 2**40, 2**62, 2**63 + 2, 2**64 - 1]
KINDS = ["fused", "fused_t", "fused_bias", "fused_t_bias", "granite", "per_expert", "pe_bias"]
NAMINGS = [
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("linear", "linear_v", "linear_1"),
]


@dataclass
class Spec:
    """A generated checkpoint: one routed-expert group, maybe damaged."""

    kind: str
    e: int
    h: int
    i: int
    dtype: str
    bias_dtype: str
    naming: int
    interleaved: bool | None
    config: bool
    io: str
    threads: int
    damage: tuple | None
    seed: int

    @property
    def p(self) -> str:
        return prefix(0, "block_sparse_moe" if self.kind == "granite" else "mlp.experts")

    @property
    def huge(self) -> bool:
        return max(self.e, self.h, self.i) >= 2**31

    def entries(self) -> list[tuple[str, str, list[int]]]:
        e, h, i, p, dt, bt = self.e, self.h, self.i, self.p, self.dtype, self.bias_dtype
        if self.kind.startswith("fused"):
            t = "_t" in self.kind
            out = [
                (f"{p}.gate_up_proj", dt, [e, h, 2 * i] if t else [e, 2 * i, h]),
                (f"{p}.down_proj", dt, [e, i, h] if t else [e, h, i]),
            ]
            if "bias" in self.kind:
                out += [
                    (f"{p}.gate_up_proj_bias", bt, [e, 2 * i]),
                    (f"{p}.down_proj_bias", bt, [e, h]),
                ]
            return out
        if self.kind == "granite":
            return [
                (f"{p}.input_linear.weight", dt, [e, 2 * i, h]),
                (f"{p}.output_linear.weight", dt, [e, h, i]),
            ]
        g, u, d = NAMINGS[self.naming]
        out = []
        for x in range(min(e, 6)):
            out += [
                (f"{p}.{x}.{g}.weight", dt, [i, h]),
                (f"{p}.{x}.{u}.weight", dt, [i, h]),
                (f"{p}.{x}.{d}.weight", dt, [h, i]),
            ]
            if self.kind == "pe_bias":
                out += [(f"{p}.{x}.{g}.bias", bt, [i]), (f"{p}.{x}.{u}.bias", bt, [i])]
                out += [(f"{p}.{x}.{d}.bias", bt, [h])]
        return out

    def file_bytes(self) -> bytes:
        entries = [list(x) for x in self.entries()]
        kind, *args = self.damage or ("none",)
        if kind == "dim" and entries:
            name_dtype_shape = entries[args[0] % len(entries)]
            shape = list(name_dtype_shape[2])
            if shape:
                shape[args[1] % len(shape)] = args[2]
            name_dtype_shape[2] = shape
        if kind == "dtype" and entries:
            entries[args[0] % len(entries)][1] = args[1]
        header, at = {}, 0
        for name, dtype, shape in entries:
            n = 1
            for d in shape:
                n *= d
            size = n * BITS[dtype] // 8
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
            at += size
        if kind == "offset" and header:
            name = sorted(header)[args[0] % len(header)]
            header[name]["data_offsets"][args[1]] += args[2]
            header[name]["data_offsets"][args[1]] = max(0, header[name]["data_offsets"][args[1]])
        raw = json.dumps(header).encode()
        data = torch.randint(
            0,
            256,
            (min(at, 1 << 20),),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(self.seed),
        )
        blob = bytearray(struct.pack("<Q", len(raw)) + raw + data.numpy().tobytes())
        if kind == "truncate":
            del blob[int(len(blob) * args[0]) :]
        elif kind == "flip" and blob:
            blob[int(len(blob) * args[0]) % len(blob)] ^= 1 << args[1]
        elif kind == "append":
            blob += bytes(args[0])
        elif kind == "header_len":
            blob[:8] = struct.pack("<Q", args[0])
        return bytes(blob)


def dims(draw) -> tuple[int, int, int]:
    e = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 2, 3, 4, 5]))
    h = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 4, 2, 3, 5]))
    i = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 6, 8, 12, 12]))  # mostly splits over TP ranks
    if draw(st.integers(0, 9)) == 0:  # a zero dimension admits any other
        dims_ = [e, h, i]
        zero, big = draw(st.permutations([0, 1, 2]))[:2]
        dims_[zero] = 0
        dims_[big] = draw(st.sampled_from(HUGE))
        e, h, i = dims_
    return e, h, i


@st.composite
def specs(draw) -> Spec:
    e, h, i = dims(draw)
    damage = draw(
        st.one_of(
            st.tuples(st.just("dim"), st.integers(0, 40), st.integers(0, 3), st.integers(0, 9)),
            st.tuples(st.just("dtype"), st.integers(0, 40), st.sampled_from(sorted(BITS))),
            st.tuples(st.just("offset"), st.integers(0, 40), st.integers(0, 1), st.integers(-9, 9)),
            st.tuples(st.just("truncate"), st.floats(0, 1)),
            st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
            st.tuples(st.just("append"), st.integers(1, 9)),
            st.tuples(st.just("header_len"), st.sampled_from([0, 7, 2**31, 2**64 - 1])),
        )
    )
    if draw(st.integers(0, 2)):
        damage = None  # two files in three are intact
    whole = st.sampled_from(
        [
            "BF16",
            "F16",
            "F32",
            "F64",
            "U8",
            "I8",
            "I16",
            "I32",
            "I64",
            "BOOL",
            "F8_E4M3",
            "C64",
            "U16",
            "F4",
        ]
    )
    return Spec(
        kind=draw(st.sampled_from(KINDS)),
        e=e,
        h=h,
        i=i,
        dtype=draw(whole),
        bias_dtype=draw(whole),
        naming=draw(st.integers(0, 2)),
        interleaved=draw(st.sampled_from([None, True, False])),
        config=draw(st.booleans()),
        io=draw(st.sampled_from(["mmap", "pread"])),
        threads=draw(st.integers(1, 3)),
        damage=damage,
        seed=draw(st.integers(0, 2**32)),
    )


@dataclass
class Request:
    tp_size: int
    tp_rank: int
    experts: tuple | None  # ("all",), ("ep", size, rank, strategy) or ("ids", [...])
    biases: bool  # give the biases, where the group has them
    wrong: str | None  # "dtype", "shape", "bias" (a bias for a group without) or None


@st.composite
def requests(draw) -> Request:
    tp_size = draw(st.sampled_from([1, 1, 2, 2, 3, 4]))
    return Request(
        tp_size=tp_size,
        tp_rank=draw(st.sampled_from([*range(tp_size)] * 4 + [tp_size])),  # or out of range
        experts=draw(experts_requests),
        biases=draw(st.booleans()),
        wrong=draw(st.sampled_from([None] * 12 + ["dtype", "shape", "bias"])),
    )


experts_requests = st.one_of(
    st.none(),
    st.tuples(
        st.just("ep"),
        st.integers(1, 4),
        st.integers(0, 3),
        st.sampled_from(["linear", "round_robin"]),
    ),
    st.tuples(
        st.just("ids"),
        st.lists(st.integers(0, 4) | st.sampled_from([-1, 5, 7, 2**40]), max_size=8),
    ),
)


def parse(blob: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), 8 + n


def tensor_bytes(header: dict, start: int, blob: bytes, name: str) -> torch.Tensor:
    """A stored tensor as bytes, `[*shape, element size]`."""
    info = header[name]
    el = BITS[info["dtype"]] // 8
    s, e = info["data_offsets"]
    raw = bytearray(blob[start + s : start + e])
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(*info["shape"], el)


def logical(layer: fml.MoeLayer, header: dict, start: int, blob: bytes) -> dict[str, torch.Tensor]:
    """gate/up `[E, I, H, el]`, down `[E, H, I, el]` (and biases) by the layout's definition,
    from the file's bytes and the tensors the library names."""
    get = lambda name: tensor_bytes(header, start, blob, name)  # noqa: E731
    e, i = layer.num_experts, layer.intermediate_size
    names = layer.tensor_names
    if layer.format == "per_expert":
        parts = [[get(n) for n in names[k * e : (k + 1) * e]] for k in range(len(names) // e)]
        labels = ["gate", "up", "down", "b_gate", "b_up", "b_down"][: len(parts)]
        return dict(zip(labels, map(torch.stack, parts), strict=True))
    gate_up, down = get(names[0]), get(names[1])
    if layer.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    split = (
        (lambda t: (t[:, 0::2], t[:, 1::2]))
        if layer.interleaved
        else (lambda t: (t[:, :i], t[:, i:]))
    )
    out = dict(zip(["gate", "up"], split(gate_up), strict=True), down=down)
    if len(names) == 4:
        out.update(zip(["b_gate", "b_up"], split(get(names[2])), strict=True))
        out["b_down"] = get(names[3])
    return out


REACHED: dict[str, int] = {}


def reached(what: str) -> None:
    REACHED[what] = REACHED.get(what, 0) + 1


def check_example(spec: Spec, reqs: list[Request], root: Path) -> None:
    reached("examples")
    path = root / "model.safetensors"
    blob = spec.file_bytes()
    path.write_bytes(blob)
    config = root / "config.json"
    if spec.config:
        config.write_text(json.dumps({"model_type": "gpt_oss"}))
    elif config.exists():
        config.unlink()
    intact = spec.damage is None and not spec.huge and BITS[spec.dtype] >= 8
    intact = intact and ("bias" not in spec.kind or BITS[spec.bias_dtype] >= 8)
    # float8 weights without scales mean nothing: refused (test_quant.py).
    intact = intact and not spec.dtype.startswith("F8_E")
    # A group with an empty dimension may be refused (or loaded, as long as it is right).
    intact = intact and min(spec.e, spec.h, spec.i) > 0
    try:
        ckpt = fml.open(path, interleaved=spec.interleaved, io=spec.io, num_threads=spec.threads)
    except fml.FastMoeLoadError as exc:
        assert not intact, f"an intact file refused: {exc}"
        reached("open refused")
        return
    with ckpt:
        try:
            layers = ckpt.moe_layers()
        except fml.FastMoeLoadError as exc:
            assert not intact, f"an intact group refused: {exc}"
            reached("detection refused")
            return
        reached("groups detected" if layers else "no group")
        if intact and not (spec.e == 0 and spec.kind.startswith("pe")):
            assert [la.prefix for la in layers] == [spec.p], layers
        header, start = parse(blob)
        for layer in layers:
            check_layer(ckpt, layer, spec, reqs, header, start, blob, intact)


def shapes_agree(layer: fml.MoeLayer, header: dict) -> bool:
    """The group's E, H, I are those of its tensors, in exact arithmetic."""
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    shapes = [header[n]["shape"] for n in layer.tensor_names]
    if layer.format == "per_expert":
        want = [[i, h]] * 2 * e + [[h, i]] * e + ([[i]] * 2 * e + [[h]] * e) * layer.has_bias
    else:
        want = [[e, h, 2 * i], [e, i, h]] if layer.transposed else [[e, 2 * i, h], [e, h, i]]
        want += [[e, 2 * i], [e, h]] * layer.has_bias
    return shapes == want


def check_layer(ckpt, layer, spec, reqs, header, start, blob, intact) -> None:
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    # See test_group_with_a_huge_zero_sized_dimension.
    assert shapes_agree(layer, header), (layer, [header[n] for n in layer.tensor_names])
    if max(e, h, i) >= 2**31:
        return  # an empty group with huge sizes: torch cannot express its views
    if intact and spec.e > 0 and layer.prefix == spec.p:
        interleaved = spec.interleaved if spec.interleaved is not None else spec.config
        assert (e, h, i) == (spec.e, spec.h, spec.i), (layer, spec)
        assert layer.interleaved == (interleaved and not spec.kind.startswith("pe")), layer
    ref = logical(layer, header, start, blob)
    if e:
        for name, view, stored_ in [("gate", layer.w1, "gate"), ("down", layer.w2, "down")]:
            got = view(e - 1)
            assert torch.equal(bits(got).view(ref[stored_][e - 1].shape), ref[stored_][e - 1]), name
    for r in reqs:
        check_request(ckpt, layer, r, ref, intact)


def check_request(ckpt, layer, r: Request, ref, intact) -> None:
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    if r.experts is None:
        ids, local = list(range(e)), None
    elif r.experts[0] == "ep":
        _, size, rank, strategy = r.experts
        ids = local = fml.expert_placement(e, size, min(rank, size - 1), strategy)
    else:
        ids = local = list(r.experts[1])
    shard = i // r.tp_size
    dtype = layer.dtype
    if r.wrong == "dtype":
        dtype = torch.float32 if dtype != torch.float32 else torch.float64
    extra = 1 if r.wrong == "shape" else 0
    shapes = {"w13": (len(ids), 2 * shard + extra, h), "w2": (len(ids), h, shard)}
    if (r.biases and layer.bias_dtype is not None) or (
        r.wrong == "bias" and layer.bias_dtype is None
    ):
        shapes.update(w13_bias=(len(ids), 2 * shard), w2_bias=(len(ids), h))
    dests = {}
    for name, shape in shapes.items():
        bias_dtype = layer.bias_dtype or dtype
        dt = bias_dtype if "bias" in name and r.wrong != "dtype" else dtype
        dests[name] = torch.empty(shape, dtype=dt)
        if dests[name].numel():
            bits(dests[name]).fill_(0xA5)
    before = {k: bits(v).clone() for k, v in dests.items()}
    valid = (
        r.wrong in (None, "bias")
        and (r.wrong != "bias" or layer.bias_dtype is not None)
        and 0 <= r.tp_rank < r.tp_size
        and i % r.tp_size == 0
        and all(0 <= x < e for x in ids)
    )
    try:
        fml.load_fused_moe(
            ckpt,
            layer.prefix,
            dests["w13"],
            dests["w2"],
            tp_rank=r.tp_rank,
            tp_size=r.tp_size,
            local_experts=local,
            w13_bias=dests.get("w13_bias"),
            w2_bias=dests.get("w2_bias"),
        )
    except fml.FastMoeLoadError as exc:
        for k, v in dests.items():
            assert torch.equal(bits(v), before[k]), f"{k} written before the error {exc}"
        # Intact files refuse only bad requests.
        assert not (intact and valid), f"valid request refused: {exc}"
        reached("load refused")
        return
    assert valid, f"bad request {r} accepted for {layer}"
    rows = slice(r.tp_rank * shard, (r.tp_rank + 1) * shard)
    want = {
        "w13": torch.cat([ref["gate"][ids][:, rows], ref["up"][ids][:, rows]], dim=1),
        "w2": ref["down"][ids][:, :, rows],
    }
    if "w13_bias" in dests:
        want["w13_bias"] = torch.cat([ref["b_gate"][ids][:, rows], ref["b_up"][ids][:, rows]], 1)
        want["w2_bias"] = ref["b_down"][ids]
    for k, v in want.items():
        assert torch.equal(bits(dests[k]), v.contiguous().view(-1)), f"{k} differs for {r}"
    reached("loaded and compared" if dests["w13"].numel() else "loaded empty")


def run_property(max_examples: int) -> None:
    """The hypothesis search; runs in a child process (see the test below)."""
    root = Path(tempfile.mkdtemp(prefix="fml-hypothesis-"))

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(spec=specs(), reqs=st.lists(requests(), min_size=1, max_size=3))
    def property_(spec: Spec, reqs: list[Request]) -> None:
        check_example(spec, reqs, root)

    try:
        property_()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(REACHED), flush=True)
    # The generator must reach correct loads, not only refusals.
    assert REACHED.get("loaded and compared", 0) * 10 >= REACHED["examples"], REACHED
    print("property held", flush=True)


def test_generated_files_and_requests_load_right_or_raise_typed_errors(tmp_path):
    """Every outcome of `open` + `moe_layers` + views + `load_fused_moe` on generated (and
    damaged) files and TP/EP requests is the right bytes or a `FastMoeLoadError` with the
    destinations untouched; never another exception, a crash or a hang.
    `FML_HYPOTHESIS_EXAMPLES` sets the number of examples (default 300)."""
    examples = int(os.environ.get("FML_HYPOTHESIS_EXAMPLES", "300"))
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_reliability as t; "
        f"t.run_property({examples})"
    )
    timeout = max(CHILD_TIMEOUT_S, examples)
    proc = run_python(code, cwd=tmp_path, timeout=timeout)
    assert proc.returncode == 0 and "property held" in proc.stdout, describe(proc)
