"""GPTQ and AWQ experts, stored input-first per expert and matrix.

GPTQ (Qwen's own `Qwen3-30B-A3B-GPTQ-Int4`, `Qwen3-235B-A22B-GPTQ-Int4`; AutoGPTQ, GPTQModel,
AutoRound's GPTQ export): `qweight` int32 `[in/8, out]` (eight int4 values of consecutive
inputs an int32), `qzeros` int32 `[in/group, out/8]`, `scales` float16 `[in/group, out]`,
`g_idx` int32 `[in]`; `quantization_config {quant_method: gptq, bits, group_size, desc_act,
sym}`. AWQ (the community's Mixtral and Qwen3 releases, AutoAWQ GEMM): `qweight` int32
`[in, out/8]` (eight outputs an int32, in the order 0, 4, 1, 5, 2, 6, 3, 7), `qzeros` int32
`[in/group, out/8]`, `scales` float16 `[in/group, out]`; `{quant_method: awq, bits,
group_size, zero_point, version: gemm}`.

Loaded input-first (`k_first=True`) into the parameters vLLM's `AutoGPTQMoEMethod` and
`AutoAWQMoEMethod` create and compared bit for bit with slices taken by hand here (vLLM's
own loading: test_vllm_real.py), for TP ranks of 1, 2, 4 and 8 and EP ranks with EPLB
replicas; and `[out, in]` like every other scheme without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_loads_as
from fastmoe_load.cli import main
from safetensors.torch import load_file, save_file

E, H, INTER = 4, 256, 1024
GROUP = 128
LAYERS = 2


def prefix(layer: int = 1, mlp: str = "mlp") -> str:
    return f"model.layers.{layer}.{mlp}.experts"


def int32(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen)


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def gptq_config(
    desc_act: bool = False, bits: int = 4, group: int = GROUP, sym: bool = True
) -> dict:
    """Qwen3-30B-A3B-GPTQ-Int4's `quantization_config` (its field set and values; `sym:
    false` as GPTQModel writes asymmetric weights)."""
    return {
        "bits": bits,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "group_size": group,
        "modules_in_block_to_quantize": None,
        "quant_method": "gptq",
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
    }


def qwen3_gptq(
    path: Path,
    desc_act: bool = False,
    bits: int = 4,
    group: int = GROUP,
    inter: int = INTER,
    sym: bool = True,
) -> Path:
    """Qwen3-30B-A3B-GPTQ-Int4's experts, scaled down (H=256; `inter` 768 is the release's
    own I): per expert `qweight`, `qzeros`, `scales` (float16) and `g_idx` (each input's
    group, `desc_act` off), float16 router."""
    gen = torch.Generator().manual_seed(20)
    pack = 32 // bits
    tensors = {}
    modules = {"gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (out, inputs) in modules.items():
                name = f"{prefix(layer)}.{e}.{module}"
                tensors[f"{name}.qweight"] = int32(inputs // pack, out, gen=gen)
                tensors[f"{name}.qzeros"] = int32(inputs // group, out // pack, gen=gen)
                tensors[f"{name}.scales"] = torch.rand(inputs // group, out, generator=gen).half()
                tensors[f"{name}.g_idx"] = torch.arange(inputs, dtype=torch.int32) // group
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, H).half()
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": E,
        "hidden_size": H,
        "moe_intermediate_size": inter,
        "torch_dtype": "float16",
        "quantization_config": gptq_config(desc_act, bits, group, sym),
    }
    return save(path, tensors, config)


def mixtral_awq(path: Path, version: str = "gemm", inter: int = INTER) -> Path:
    """Mixtral-8x7B-Instruct-AWQ's experts (AutoAWQ GEMM), scaled down: per expert `w1`,
    `w3`, `w2` with `qweight [in, out/8]`, `qzeros [in/128, out/8]`, `scales` float16."""
    gen = torch.Generator().manual_seed(21)
    tensors = {}
    modules = {"w1": (inter, H), "w3": (inter, H), "w2": (H, inter)}
    for layer in range(LAYERS):
        for e in range(E):
            for module, (out, inputs) in modules.items():
                name = f"{prefix(layer, 'block_sparse_moe')}.{e}.{module}"
                tensors[f"{name}.qweight"] = int32(inputs, out // 8, gen=gen)
                tensors[f"{name}.qzeros"] = int32(inputs // GROUP, out // 8, gen=gen)
                tensors[f"{name}.scales"] = torch.rand(inputs // GROUP, out, generator=gen).half()
        gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        tensors[gate] = torch.randn(E, H).half()
    quant = {
        "bits": 4,
        "group_size": GROUP,
        "modules_to_not_convert": ["gate"],
        "quant_method": "awq",
        "version": version,
        "zero_point": True,
    }
    config = {
        "model_type": "mixtral",
        "num_local_experts": E,
        "intermediate_size": inter,
        "quantization_config": quant,
    }
    return save(path, tensors, config)


@pytest.fixture(scope="module")
def gptq(tmp_path_factory) -> Path:
    return qwen3_gptq(tmp_path_factory.mktemp("gptq"))


@pytest.fixture(scope="module")
def awq(tmp_path_factory) -> Path:
    return mixtral_awq(tmp_path_factory.mktemp("awq"))


def expected(
    path: Path,
    group_prefix: str,
    names: tuple[str, str, str],
    tp_rank: int,
    tp: int,
    experts: list[int],
    k_first: bool,
    awq: bool = False,
) -> dict[str, torch.Tensor]:
    """vLLM's GPTQ/AWQ Marlin parameters (`k_first`) or the `[out, in]` ones, sliced by hand
    from the stored input-first tensors: gate's and up's outputs of the rank's shard (packs of
    eight outputs for AWQ's weights and every scheme's zero points), down's inputs (packs of
    eight for GPTQ's weight, groups for scales and zero points)."""
    tensors = load_file(path / "model.safetensors")
    shard = INTER // tp
    gate, up, down = names

    def t(e: int, module: str, kind: str) -> torch.Tensor:
        return tensors[f"{group_prefix}.{e}.{module}.{kind}"]

    def outputs(kind: str) -> slice:  # columns of a stored gate/up tensor
        per = 8 if kind == "qzeros" or (awq and kind == "qweight") else 1
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    def inputs(kind: str) -> slice:  # rows of a stored down tensor
        per = {"qweight": 1 if awq else 8, "scales": GROUP, "qzeros": GROUP}[kind]
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    want = {}
    for kind, dest in (("qweight", ""), ("scales", "_scales"), ("qzeros", "_qzeros")):
        # Input-first per expert: [in', out'] with gate's columns then up's.
        w13 = torch.stack(
            [
                torch.cat([t(e, gate, kind)[:, outputs(kind)], t(e, up, kind)[:, outputs(kind)]], 1)
                for e in experts
            ]
        )
        w2 = torch.stack([t(e, down, kind)[inputs(kind)] for e in experts])
        if not k_first:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        want[f"w13{dest}"], want[f"w2{dest}"] = w13, w2
    return want


GPTQ_NAMES = ("gate_proj", "up_proj", "down_proj")
AWQ_NAMES = ("w1", "w3", "w2")


def test_gptq_detected_with_companions_and_group_index(gptq):
    with fml.open(gptq) as ckpt:
        assert [g.prefix for g in ckpt.moe_layers()] == [prefix(0), prefix(1)]
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix())
        assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (E, H, INTER)
        assert (layer.pack, layer.out_pack, layer.k_first) == (8, 1, True)
        assert layer.dtype == torch.int32
        q = layer.quantization
        assert q is not None and q.method == "gptq" and q.weights == "int4"
        assert str(q) == "gptq int4, 128-value group scales in float16 (qzeros, scales)"
        assert q.companion("qzeros").block == (8, GROUP)
        assert len(layer.discarded) == 3 * E
        assert all(n.endswith(".g_idx") for n in layer.discarded)
        assert set(layer.discarded) <= set(layer.tensor_names)
        tensors = load_file(gptq / "model.safetensors")
        name = f"{prefix()}.2.gate_proj"
        # Views are the [out, in] matrices: the stored tensors transposed.
        assert torch.equal(layer.w1(2), tensors[f"{name}.qweight"].T)
        assert torch.equal(layer.w2(3), tensors[f"{prefix()}.3.down_proj.qweight"].T)
        assert torch.equal(layer.companion("scales", "w1", 2), tensors[f"{name}.scales"].T)
        assert torch.equal(layer.companion("qzeros", "w1", 2), tensors[f"{name}.qzeros"].T)


def test_awq_detected_packed_along_outputs(awq):
    with fml.open(awq) as ckpt:
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix(1, "block_sparse_moe"))
        assert (layer.hidden_size, layer.intermediate_size) == (H, INTER)
        assert (layer.pack, layer.out_pack, layer.k_first) == (1, 8, True)
        assert layer.discarded == ()
        assert str(layer.quantization) == (
            "awq int4, 128-value group scales in float16 (qzeros, scales)"
        )
        tensors = load_file(awq / "model.safetensors")
        w1 = tensors[f"{prefix(1, 'block_sparse_moe')}.0.w1.qweight"]
        assert tuple(layer.w1(0).shape) == (INTER // 8, H)
        assert torch.equal(layer.w1(0), w1.T)


@pytest.mark.parametrize("k_first", [True, False])
@pytest.mark.parametrize(("tp_rank", "tp"), [(0, 1), (1, 2), (3, 4), (5, 8)])
def test_gptq_loads_as_sliced_by_hand(gptq, tp_rank, tp, k_first):
    experts = list(range(E))
    want = expected(gptq, prefix(), GPTQ_NAMES, tp_rank, tp, experts, k_first)
    if k_first:
        shard = INTER // tp
        assert want["w13"].shape == (E, H // 8, 2 * shard)  # vLLM's w13_qweight
        assert want["w2_qzeros"].shape == (E, shard // GROUP, H // 8)
    assert_loads_as(gptq, prefix(), want, tp_rank=tp_rank, tp_size=tp, k_first=k_first)


@pytest.mark.parametrize("k_first", [True, False])
@pytest.mark.parametrize(("tp_rank", "tp"), [(0, 1), (1, 2), (3, 4), (7, 8)])
def test_awq_loads_as_sliced_by_hand(awq, tp_rank, tp, k_first):
    experts = [3, 1]
    group = prefix(1, "block_sparse_moe")
    want = expected(awq, group, AWQ_NAMES, tp_rank, tp, experts, k_first, awq=True)
    if k_first:
        assert want["w13"].shape == (2, H, 2 * INTER // tp // 8)  # vLLM's w13_qweight
    assert_loads_as(
        awq, group, want, tp_rank=tp_rank, tp_size=tp, local_experts=experts, k_first=k_first
    )


def test_expert_parallel_ranks_with_replicas(gptq):
    """An EP rank (whole experts) holding EPLB replicas: expert 2 in two slots."""
    experts = [2, 0, 2]
    want = expected(gptq, prefix(), GPTQ_NAMES, 0, 1, experts, k_first=True)
    assert_loads_as(gptq, prefix(), want, local_experts=experts, k_first=True)


def test_tp_split_off_the_groups_names_those_that_fit(gptq):
    """I=1024 in 128-value groups: 16 ranks would cut them (64 each)."""
    with fml.open(gptq) as ckpt:
        layer = ckpt.experts(prefix())
        assert layer.tp_split_error(8) is None
        message = layer.tp_split_error(16)
        assert message is not None and "tp_size that fit: 1, 2, 4, 8" in message
        w = torch.zeros(E, H // 8, 2 * INTER // 16, dtype=torch.int32)
        with pytest.raises(fml.RequestError, match="128-value blocks"):
            fml.load_fused_moe(ckpt, prefix(), w, w, tp_rank=0, tp_size=16, k_first=True)


def test_scales_destinations_are_required_and_shaped(gptq):
    with fml.open(gptq) as ckpt:
        layer = ckpt.experts(prefix())
        shapes = fml.destination_shapes(layer, 2, 2, k_first=True)
        assert shapes["w13"] == ((2, H // 8, INTER), torch.int32)
        assert shapes["w2"] == ((2, INTER // 2 // 8, H), torch.int32)
        assert shapes["w13_scales"] == ((2, H // GROUP, INTER), torch.float16)
        assert shapes["w2_scales"] == ((2, INTER // 2 // GROUP, H), torch.float16)
        assert shapes["w13_qzeros"] == ((2, H // GROUP, INTER // 8), torch.int32)
        assert shapes["w2_qzeros"] == ((2, INTER // 2 // GROUP, H // 8), torch.int32)
        assert set(shapes) == {"w13", "w2", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros"}
        w13 = torch.zeros(E, H // 8, 2 * INTER, dtype=torch.int32)
        w2 = torch.zeros(E, INTER // 8, H, dtype=torch.int32)
        with pytest.raises(fml.RequestError, match="scales has no w13_qzeros, w13_scales"):
            fml.load_fused_moe(ckpt, prefix(), w13, w2, k_first=True)
        assert not w13.any()


def one_group_per_output(path: Path) -> Path:
    """GPTQ with `group_size: -1` (one scale per output): every `in/group` is 1."""
    path = qwen3_gptq(path, group=H)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = -1
    (path / "config.json").write_text(json.dumps(config))
    return path


def with_dynamic_overrides(path: Path) -> Path:
    """GPTQModel's `dynamic` rules, which may give the experts other bits or groups."""
    path = qwen3_gptq(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {r"+:.*\.experts\..*": {"bits": 8}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("make", "declared"),
    [
        (lambda p: qwen3_gptq(p, desc_act=True), "gptq int4 with activation order (desc_act)"),
        (one_group_per_output, "gptq int4 with one group per output"),
        (lambda p: mixtral_awq(p, version="gemv"), "awq gemv"),
        (with_dynamic_overrides, "gptq int4 with per-module overrides (dynamic)"),
    ],
)
def test_variants_vllm_refuses_or_packs_otherwise_are_named(tmp_path, make, declared):
    """Activation order (vLLM 0.33+ refuses `desc_act`), one group per output, AWQ's GEMV
    packing, per-module overrides: named by `unsupported_groups()` and the warning, never
    loaded."""
    path = make(tmp_path / "x")
    with pytest.warns(fml.UnsupportedWarning, match="declares"):
        ckpt = fml.open(path)
    with ckpt, pytest.warns(fml.UnsupportedWarning):
        assert ckpt.moe_layers() == []
        groups = ckpt.unsupported_groups()
        assert groups and all(declared in g.reason for g in groups)


def test_qweight_without_a_gptq_or_awq_config_is_unsupported(tmp_path):
    path = qwen3_gptq(tmp_path / "x")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with fml.open(path) as ckpt, pytest.warns(fml.UnsupportedWarning):
        assert ckpt.moe_layers() == []
        reasons = [g.reason for g in ckpt.unsupported_groups()]
        assert reasons and all(r.startswith("unknown quantization") for r in reasons)


def test_inspect_names_the_scheme(gptq, awq, capsys):
    assert main(["inspect", str(gptq)]) == 0
    out = capsys.readouterr().out
    assert "gptq int4, 128-value group scales in float16" in out
    assert main(["inspect", str(awq)]) == 0
    assert "awq int4, 128-value group scales in float16" in capsys.readouterr().out


def test_bench_checkpoint_is_qwen3_gptq_and_the_seed_loop_agrees(tmp_path):
    """The bench's generated GPTQ checkpoint is detected as the release is, and its seed
    path (vLLM's per-expert loop through its `is_transposed` branch) fills what fastmoe_load
    fills input-first, for TP rank 1 of 2 with EPLB-like local experts."""
    from fastmoe_load.bench.quant import Fp8Shape, generate_fp8
    from fastmoe_load.bench.seed import seed_load

    shape = Fp8Shape(layers=1, experts=4, hidden=256, intermediate=512, scheme="gptq")
    path = tmp_path / "ckpt"
    generate_fp8(str(path), shape)
    experts = [3, 0, 3]
    with fml.open(path) as ckpt:
        (layer,) = ckpt.moe_layers()
        assert str(layer.quantization).startswith("gptq int4, 128-value group scales")
        assert sum(ckpt.tensor(n).nbytes for n in layer.tensor_names) == shape.layer_bytes
        shapes = fml.destination_shapes(layer, len(experts), 2, k_first=True)
        ours = {n: torch.full(s, 0x5A, dtype=d) for n, (s, d) in shapes.items()}
        seed = {n: torch.full(s, 0x3C, dtype=d) for n, (s, d) in shapes.items()}
        scales = {n: t for n, t in ours.items() if n not in ("w13", "w2")}
        fml.load_fused_moe(
            ckpt, layer.prefix, ours["w13"], ours["w2"], tp_rank=1, tp_size=2,
            local_experts=experts, scales=scales, k_first=True,
        )  # fmt: skip
    seed_load(
        str(path), layer, seed["w13"], seed["w2"], tp_rank=1, tp_size=2, local_experts=experts,
        scales={n: t for n, t in seed.items() if n not in ("w13", "w2")}, k_first=True,
    )  # fmt: skip
    for name in shapes:
        assert torch.equal(ours[name].view(torch.uint8), seed[name].view(torch.uint8)), name


def test_bench_quant_gptq_prints_its_rows(tmp_path, capsys):
    root = tmp_path / "bench"
    options = ["bench", "--quant", "gptq", "--experts", "8", "--hidden", "256"]
    options += ["--intermediate", "256", "--layers", "1", "--repeats", "1", "--dir", str(root)]
    assert main([*options, "--clean"]) == 0
    out = capsys.readouterr().out
    for case in ("TP=1", "TP=2 rank 1", "EP=8 rank 1"):
        for row in ("fastmoe_load gptq + scales", "seed: vLLM per-expert loop, gptq + scales"):
            assert any(line.startswith(row) and case in line for line in out.splitlines())
    assert not root.exists()


def test_convert_refuses_before_writing_or_carries_every_tensor(gptq, tmp_path, capsys):
    """GPTQ has no fused transformers form: `convert` refuses before writing anything; to
    per-expert it carries every tensor, `g_idx` included, and the copy loads the same."""
    assert main(["convert", str(gptq), str(tmp_path / "fused")]) == 1
    assert "no fused transformers form; keep this checkpoint per expert" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()
    out = tmp_path / "per_expert"
    assert main(["convert", "--to", "per_expert", str(gptq), str(out)]) == 0
    assert load_file(out / "model-00001-of-00001.safetensors").keys() == (
        load_file(gptq / "model.safetensors").keys()
    )
    want = expected(gptq, prefix(), GPTQ_NAMES, 1, 2, [1, 2], k_first=True)
    assert_loads_as(out, prefix(), want, tp_rank=1, tp_size=2, local_experts=[1, 2], k_first=True)


def test_moe_wna16_split_vllm_cannot_serve_is_refused_naming_those_it_can(tmp_path):
    """vLLM's `MoeWNA16Method` halves a 128-value group until it divides I/tp and H, never
    under 32: Qwen3-30B-A3B's I=768 at TP=16 (48 rows a rank) it cannot serve. A layer
    described so is refused before a byte is written, naming the TP sizes it serves (768's
    divisors whose shares take groups of 128, 64 or 32)."""
    from fastmoe_load.engines.spec import ExpertLayerSpec, fill_layer
    from fastmoe_load.engines.wna16 import Wna16

    path = qwen3_gptq(tmp_path / "gptq", inter=768)
    wna16 = Wna16(method="gptq", bits=4, group_size=32, zero_points=False)
    with fml.open(path) as ckpt:
        layer = ckpt.experts(prefix())
        shapes = wna16.shapes(E, H, 768 // 16)
        parameters = {
            name: torch.full(shape, 0xA5, dtype=torch.uint8)
            if not name.endswith("scales")
            else torch.full(shape, float("nan"), dtype=torch.bfloat16)
            for name, shape in shapes.items()
        }
        spec = ExpertLayerSpec(
            group=layer,
            parameters=parameters,
            names={name: name for name in parameters},
            tp_rank=1,
            tp_size=16,
            experts=list(range(E)),
            interleaved=False,
            wna16=wna16,
        )
        problem = spec.problem()
        assert problem is not None and "serves tp_size 1, 2, 3, 4, 6, 8, 12, 24" in problem
        with pytest.raises(fml.RequestError, match="32-value groups do not divide"):
            fill_layer(ckpt, spec)
    for name, tensor in parameters.items():
        poison = tensor.isnan() if tensor.is_floating_point() else tensor == 0xA5
        assert poison.all(), f"{name} written before the error"
