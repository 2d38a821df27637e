"""Per-expert OCP MX experts, one e8m0 scale per 32 values of a row, as the 2026 releases store
them, with their names, dtypes and grids:

- DeepSeek-V4 (Flash/Pro): no `model.` prefix, `layers.N.ffn.experts.E.w1/w3/w2.weight`
  int8-typed bytes of two e2m1 values `[out, in/2]`, `….scale` float8_e8m0fnu `[out, in/32]`;
  fp8 shared experts with 128 x 128 e8m0 `scale`s, a bf16 router with a float32 bias, MTP
  experts under `mtp.0.ffn.experts`; `expert_dtype: fp4` beside an fp8 `quantization_config`.
- Kimi-K3: compressed-tensors `mxfp4-pack-quantized`, `language_model.model.layers.N.
  block_sparse_moe.experts.E.w1.weight_packed` uint8 and `.weight_scale` uint8.
- AMD Quark OCP MX: `….experts.E.gate_proj.weight` uint8, `.weight_scale` uint8, float32
  `input_scale` scalars for `w_mxfp4_a_fp8`.
- MXFP8 (MiniMax-M3-MXFP8, ModelOpt): float8 e4m3 `weight [out, in]`, `weight_scale` uint8.

Loaded into the parameters vLLM's `Mxfp4MoEMethod`, `QuarkOCP_MX_MoEMethod` and
`ModelOptMxFp8FusedMoE` create (uint8 weights and scales; float8 for MXFP8) and compared bit for
bit with slices taken by hand; vLLM's own loading: test_vllm_real.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, assert_loads_as, seed_filled
from fastmoe_load.cli import main
from safetensors.torch import load_file, save_file

E, H, INTER = 4, 128, 256
MX = 32
E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn
GATE_UP_DOWN = ("w1", "w3", "w2")
PROJ = ("gate_proj", "up_proj", "down_proj")


def dims(slot: int, hidden: int = H, inter: int = INTER) -> tuple[int, int]:
    return (inter, hidden) if slot < 2 else (hidden, inter)


def mx_bytes(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes: every pattern, compared as bytes."""
    return torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)


def e8m0(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """e8m0 exponents around 2**0, with 2**-7 (byte 120, which a numeric copy into uint8
    would turn into 0) and 2**8 among them."""
    exponents = torch.randint(118, 136, (rows, cols), dtype=torch.uint8, generator=gen)
    exponents[0, 0], exponents[-1, -1] = 120, 135
    return exponents


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def mx_experts(
    prefix: str,
    modules: tuple[str, str, str],
    weight: str,
    scale: str,
    gen: torch.Generator,
    *,
    weight_dtype: torch.dtype,
    scale_dtype: torch.dtype,
    pack: int,
    experts: int = E,
    hidden: int = H,
    inter: int = INTER,
) -> dict[str, torch.Tensor]:
    tensors = {}
    for e in range(experts):
        for slot, module in enumerate(modules):
            rows, cols = dims(slot, hidden, inter)
            tensors[f"{prefix}.{e}.{module}.{weight}"] = mx_bytes(rows, cols // pack, gen).view(
                weight_dtype
            )
            tensors[f"{prefix}.{e}.{module}.{scale}"] = e8m0(rows, cols // MX, gen).view(
                scale_dtype
            )
    return tensors


def deepseek_v4(
    path: Path,
    *,
    experts: int = E,
    hidden: int = H,
    inter: int = INTER,
    where: str = "top",
    layers: int = 2,
) -> Path:
    """DeepSeek-V4-Flash's layout, `expert_dtype: fp4` at the top of config.json (`where`:
    `top`, `quantization_config` as V4.1 puts it, or `text_config`)."""
    gen = torch.Generator().manual_seed(4)
    tensors: dict[str, torch.Tensor] = {}
    for layer in [*(f"layers.{n}" for n in range(layers)), "mtp.0"]:
        ffn = f"{layer}.ffn"
        tensors |= mx_experts(
            f"{ffn}.experts",
            GATE_UP_DOWN,
            "weight",
            "scale",
            gen,
            weight_dtype=torch.int8,
            scale_dtype=E8M0,
            pack=2,
            experts=experts,
            hidden=hidden,
            inter=inter,
        )
        for slot, module in enumerate(GATE_UP_DOWN):
            rows, cols = dims(slot, hidden, inter)
            tensors[f"{ffn}.shared_experts.{module}.weight"] = mx_bytes(rows, cols, gen).view(FP8)
            tensors[f"{ffn}.shared_experts.{module}.scale"] = e8m0(
                -(-rows // 128), -(-cols // 128), gen
            ).view(E8M0)
        tensors[f"{ffn}.gate.weight"] = torch.randn(experts, hidden, generator=gen).bfloat16()
        tensors[f"{ffn}.gate.bias"] = torch.randn(experts, generator=gen)
    quant = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    config: dict = {"model_type": "deepseek_v4", "n_routed_experts": experts}
    if where == "top":
        config |= {"expert_dtype": "fp4", "quantization_config": quant}
    elif where == "quantization_config":
        config |= {"quantization_config": quant | {"expert_dtype": "fp4"}}
    else:
        config = {
            "model_type": "deepseek_v4_vl",
            "text_config": config | {"expert_dtype": "fp4", "quantization_config": quant},
        }
    return save(path, tensors, config)


KIMI_K3_QUANT = {
    "quant_method": "compressed-tensors",
    "format": "mxfp4-pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "float",
                "strategy": "group",
                "group_size": 32,
                "symmetric": True,
                "dynamic": False,
                "scale_dtype": "torch.uint8",
            },
            "input_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"],
}


def kimi_k3(path: Path, inter: int = INTER) -> Path:
    """Kimi-K3's routed experts: compressed-tensors `mxfp4-pack-quantized` under the
    `language_model.` prefix, bf16 shared experts beside; `inter` values of intermediate
    size."""
    gen = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(2):
        moe = f"language_model.model.layers.{layer}.block_sparse_moe"
        tensors |= mx_experts(
            f"{moe}.experts",
            GATE_UP_DOWN,
            "weight_packed",
            "weight_scale",
            gen,
            weight_dtype=torch.uint8,
            scale_dtype=torch.uint8,
            pack=2,
            inter=inter,
        )
        tensors[f"{moe}.shared_experts.w1.weight"] = torch.randn(INTER, H).bfloat16()
        tensors[f"{moe}.gate.weight"] = torch.randn(E, H, generator=gen).bfloat16()
    return save(path, tensors, {"model_type": "kimi_k3", "quantization_config": KIMI_K3_QUANT})


def quark_quant(dtype: str = "fp4", input_scales: bool = False) -> dict:
    """AMD Quark's `quantization_config` for OCP MX weights (`w_mxfp4`, or `w_mxfp4_a_fp8`
    with static per-tensor fp8 input scales)."""
    weight = {
        "dtype": dtype,
        "qscheme": "per_group",
        "group_size": 32,
        "ch_axis": -1,
        "is_dynamic": False,
        "scale_format": "e8m0",
        "scale_calculation_mode": "even",
        "round_method": "half_even",
    }
    inputs = (
        {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False, "symmetric": True}
        if input_scales
        else None
    )
    return {
        "quant_method": "quark",
        "export": {"kv_cache_group": [], "pack_method": "reorder"},
        "global_quant_config": {"weight": weight, "input_tensors": inputs, "output_tensors": None},
        "exclude": ["lm_head", "re:.*self_attn.*"],
        "layer_quant_config": {},
        "layer_type_quant_config": {},
    }


def quark_mxfp4(path: Path, *, input_scales: bool = False) -> Path:
    """amd/DeepSeek-R1-0528-MXFP4's layout: `gate_proj/up_proj/down_proj.weight` uint8 and
    `.weight_scale` uint8 per expert; `input_scale` float32 scalars for `w_mxfp4_a_fp8`."""
    gen = torch.Generator().manual_seed(6)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(2):
        prefix = f"model.layers.{layer + 3}.mlp.experts"
        tensors |= mx_experts(
            prefix,
            PROJ,
            "weight",
            "weight_scale",
            gen,
            weight_dtype=torch.uint8,
            scale_dtype=torch.uint8,
            pack=2,
        )
        if input_scales:
            for e in range(E):
                for module in PROJ:
                    scale = torch.rand((), generator=gen) + 0.5
                    tensors[f"{prefix}.{e}.{module}.input_scale"] = scale
        tensors[f"model.layers.{layer + 3}.mlp.gate.weight"] = torch.randn(E, H).bfloat16()
    config = {"model_type": "deepseek_v3", "quantization_config": quark_quant("fp4", input_scales)}
    return save(path, tensors, config)


MXFP8_QUANTS = {
    "modelopt": {
        "quant_method": "modelopt",
        "quant_algo": "MXFP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    },
    "minimax": {"quant_method": "mxfp8", "ignored_layers": ["lm_head"]},
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "mxfp8-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "group",
                    "group_size": 32,
                    "symmetric": True,
                    "dynamic": False,
                    "scale_dtype": "torch.uint8",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "group",
                    "group_size": 32,
                    "dynamic": True,
                    "scale_dtype": "torch.uint8",
                },
            }
        },
        "ignore": ["lm_head"],
    },
}


def mxfp8(path: Path, flavor: str = "modelopt") -> Path:
    """MiniMax-M3-MXFP8's routed experts per expert (`block_sparse_moe.experts.E.w1/w3/w2`):
    float8 e4m3 `weight` and uint8 e8m0 `weight_scale` per 32 values."""
    gen = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(2):
        moe = f"model.layers.{layer}.block_sparse_moe"
        tensors |= mx_experts(
            f"{moe}.experts",
            GATE_UP_DOWN,
            "weight",
            "weight_scale",
            gen,
            weight_dtype=FP8,
            scale_dtype=torch.uint8,
            pack=1,
        )
        tensors[f"{moe}.gate.weight"] = torch.randn(E, H, generator=gen).bfloat16()
    config = {"model_type": "minimax_m3", "quantization_config": MXFP8_QUANTS[flavor]}
    return save(path, tensors, config)


# name -> (builder, experts prefix, module names, weight name, scale name, stored weight
# dtype, stored scale dtype, values per stored weight element, weights as `Quantization` says)
Release = tuple[Callable[[Path], Path], str, tuple[str, str, str], str, str, torch.dtype]
RELEASES: dict[str, tuple] = {
    "deepseek_v4": (
        deepseek_v4,
        "layers.1.ffn.experts",
        GATE_UP_DOWN,
        "weight",
        "scale",
        torch.int8,
        E8M0,
        2,
        "fp8 mxfp4",
    ),
    "kimi_k3": (
        kimi_k3,
        "language_model.model.layers.1.block_sparse_moe.experts",
        GATE_UP_DOWN,
        "weight_packed",
        "weight_scale",
        torch.uint8,
        torch.uint8,
        2,
        "compressed-tensors mxfp4",
    ),
    "quark": (
        quark_mxfp4,
        "model.layers.4.mlp.experts",
        PROJ,
        "weight",
        "weight_scale",
        torch.uint8,
        torch.uint8,
        2,
        "quark mxfp4",
    ),
    "mxfp8": (
        mxfp8,
        "model.layers.1.block_sparse_moe.experts",
        GATE_UP_DOWN,
        "weight",
        "weight_scale",
        FP8,
        torch.uint8,
        1,
        "modelopt mxfp8",
    ),
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    return {name: spec[0](tmp_path_factory.mktemp(name)) for name, spec in RELEASES.items()}


def destination_dtype(stored: torch.dtype) -> torch.dtype:
    """vLLM's parameter dtype for stored values: uint8 for bytes (packed fp4, e8m0)."""
    return FP8 if stored == FP8 else torch.uint8


def expected(
    path: Path, name: str, tp_rank: int, tp: int, experts: list[int]
) -> dict[str, torch.Tensor]:
    """vLLM's parameters sliced by hand: gate rows then up rows of the rank's shard, down's
    columns; stored elements `pack` values each, one scale per 32 values."""
    _, prefix, modules, weight, scale, stored_dtype, _, pack, _ = RELEASES[name]
    tensors = load_file(path / "model.safetensors")
    shard = INTER // tp
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)

    def cols(per: int) -> slice:
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    def t(e: int, slot: int, kind: str) -> torch.Tensor:
        stored = tensors[f"{prefix}.{e}.{modules[slot]}.{kind}"]
        return stored if stored.dtype == FP8 else stored.view(torch.uint8)

    def w13(kind: str) -> torch.Tensor:
        return torch.stack([torch.cat([t(e, 0, kind)[rows], t(e, 1, kind)[rows]]) for e in experts])

    assert destination_dtype(stored_dtype) in (FP8, torch.uint8)
    return {
        "w13": w13(weight),
        "w2": torch.stack([t(e, 2, weight)[:, cols(pack)] for e in experts]),
        "w13_weight_scale": w13(scale),
        "w2_weight_scale": torch.stack([t(e, 2, scale)[:, cols(MX)] for e in experts]),
    }


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_detected_as_the_release_names_them(releases, name):
    _, prefix, _, _, scale, weight_dtype, scale_dtype, pack, weights = RELEASES[name]
    with fml.open(releases[name]) as ckpt:
        layers = ckpt.moe_layers()
        assert ckpt.unsupported_groups() == []
        layer = ckpt.experts(prefix)
        assert prefix in [x.prefix for x in layers]
        assert (layer.format, layer.num_experts, layer.hidden_size, layer.intermediate_size) == (
            "per_expert",
            E,
            H,
            INTER,
        )
        assert (layer.dtype, layer.pack) == (weight_dtype, pack)
        q = layer.quantization
        assert q is not None
        assert [c.kind for c in q.companions] == ["weight_scale"]
        assert (q.scheme, q.block_size, q.weight_scale.dtype) == ("group", (1, MX), scale_dtype)
        assert str(q).startswith(f"{weights}, 32-value group scales in "), str(q)
        # The views read the stored bytes: a scale of DeepSeek-V4 is its `scale`.
        stored = load_file(releases[name] / "model.safetensors")
        module = RELEASES[name][2][2]
        assert_bitwise_equal(layer.w2_scale(1), stored[f"{prefix}.1.{module}.{scale}"])
        assert_bitwise_equal(layer.w2(1), stored[f"{prefix}.1.{module}.{RELEASES[name][3]}"])


def test_deepseek_v4_groups_are_the_routed_and_mtp_experts(tmp_path):
    """Every place `expert_dtype` can live gives the same groups: the routed experts of each
    layer and of the MTP layer, not the fp8 shared experts nor the router."""
    for where in ("top", "quantization_config", "text_config"):
        with fml.open(deepseek_v4(tmp_path / where, where=where)) as ckpt:
            prefixes = [layer.prefix for layer in ckpt.moe_layers()]
            assert prefixes == ["layers.0.ffn.experts", "layers.1.ffn.experts", "mtp.0.ffn.experts"]
            assert ckpt.unsupported_groups() == []


@pytest.mark.parametrize("name", sorted(RELEASES))
@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"),
    [(0, 1, None), (1, 2, None), (3, 4, [2, 0]), (7, 8, [3, 1, 3])],
)
def test_loads_bit_for_bit(releases, name, tp_rank, tp, experts):
    """TP 1/2/4/8 and EP ranks with an EPLB replica: uint8 destinations take the int8-typed
    fp4 bytes and the float8_e8m0fnu scales as bytes (2**-7 stays byte 120)."""
    local = list(range(E)) if experts is None else experts
    want = expected(releases[name], name, tp_rank, tp, local)
    assert (want["w13_weight_scale"] == 120).any()
    prefix = RELEASES[name][1]
    assert_loads_as(
        releases[name], prefix, want, tp_rank=tp_rank, tp_size=tp, local_experts=experts
    )
    # The pure-Python loop of the bench writes the same.
    got = seed_filled(releases[name], prefix, want, tp_rank, tp, local)
    for key, tensor in want.items():
        assert_bitwise_equal(got[key], tensor, key)


def test_a_split_off_the_32_value_blocks_is_refused_naming_the_sizes_that_fit(releases):
    path = releases["deepseek_v4"]
    want = expected(path, "deepseek_v4", 0, 8, list(range(E)))
    with fml.open(path) as ckpt:
        assert ckpt.experts(RELEASES["deepseek_v4"][1]).tp_split_error(16) is not None
        poisoned = {k: torch.full((E, 2, 2), 7, dtype=v.dtype) for k, v in want.items()}
        with pytest.raises(fml.RequestError, match="tp_size that fit: 1, 2, 4, 8"):
            fml.load_fused_moe(
                ckpt,
                RELEASES["deepseek_v4"][1],
                poisoned["w13"],
                poisoned["w2"],
                tp_size=16,
                scales={k: v for k, v in poisoned.items() if k.startswith("w")},
            )
        assert all((t == 7).all() for t in poisoned.values())


def test_float32_destinations_for_e8m0_bytes_are_refused(releases):
    """An MX scale is an exponent byte: a float32 parameter would take a converted value,
    which is not what vLLM's OCP MX methods hold; only `allow_cast` converts it."""
    path = releases["deepseek_v4"]
    prefix = RELEASES["deepseek_v4"][1]
    want = expected(path, "deepseek_v4", 0, 1, list(range(E)))
    scales = {k: torch.zeros(want[k].shape) for k in ("w13_weight_scale", "w2_weight_scale")}
    with fml.open(path) as ckpt:
        with pytest.raises(fml.RequestError, match=r"w13_weight_scale has dtype torch\.float32"):
            fml.load_fused_moe(
                ckpt,
                prefix,
                torch.empty_like(want["w13"]),
                torch.empty_like(want["w2"]),
                scales=scales,
            )
        # int8 destinations for DeepSeek-V4's bytes are its own dtype, also fine.
        w13 = torch.empty(want["w13"].shape, dtype=torch.int8)
        w2 = torch.empty(want["w2"].shape, dtype=torch.int8)
        fml.load_fused_moe(
            ckpt,
            prefix,
            w13,
            w2,
            scales={k: torch.empty_like(want[k]) for k in scales},
        )
    assert torch.equal(w13.view(torch.uint8), want["w13"])


def test_quark_input_scales_ride_with_the_experts(tmp_path):
    """`w_mxfp4_a_fp8`: one float32 input scale per expert for gate and up (the up
    projection's, as vLLM's loader leaves it) and one for down."""
    path = quark_mxfp4(tmp_path / "quark", input_scales=True)
    prefix = RELEASES["quark"][1]
    tensors = load_file(path / "model.safetensors")
    local = [3, 1]
    want = expected(path, "quark", 1, 2, local) | {
        "w13_input_scale": torch.stack(
            [tensors[f"{prefix}.{e}.up_proj.input_scale"] for e in local]
        ),
        "w2_input_scale": torch.stack(
            [tensors[f"{prefix}.{e}.down_proj.input_scale"] for e in local]
        ),
    }
    with fml.open(path) as ckpt:
        kinds = [c.kind for c in ckpt.experts(prefix).quantization.companions]
    assert sorted(kinds) == ["input_scale", "weight_scale"]
    assert_loads_as(path, prefix, want, tp_rank=1, tp_size=2, local_experts=local)


@pytest.mark.parametrize("flavor", sorted(MXFP8_QUANTS))
def test_mxfp8_configs_all_read(tmp_path, flavor):
    path = mxfp8(tmp_path / flavor, flavor)
    with fml.open(path) as ckpt:
        layer = ckpt.experts(RELEASES["mxfp8"][1])
        assert layer.quantization.weights == "mxfp8"
        assert layer.quantization.method == {"minimax": "mxfp8"}.get(flavor, flavor)


def test_other_quark_schemes_are_declared_and_not_loaded(tmp_path):
    path = quark_mxfp4(tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["global_quant_config"]["weight"] = {
        "dtype": "fp8_e4m3",
        "qscheme": "per_tensor",
    }
    (path / "config.json").write_text(json.dumps(config))
    with pytest.warns(fml.UnsupportedWarning, match="quark fp8_e4m3 per_tensor"):
        ckpt = fml.open(path)
    with ckpt, pytest.warns(fml.UnsupportedWarning):
        assert ckpt.moe_layers() == []
        assert "quark fp8_e4m3 per_tensor" in ckpt.unsupported_groups()[0].reason


def test_inspect_names_the_scheme(releases, capsys):
    assert main(["inspect", str(releases["deepseek_v4"])]) == 0
    out = capsys.readouterr().out
    assert "layers.0.ffn.experts" in out and "mtp.0.ffn.experts" in out
    assert "mxfp4" in out and "float8_e8m0fnu" in out, out


def test_mxfp4_expert_bench_rows(tmp_path, capsys):
    """`bench --quant mxfp4-expert` on a tiny DeepSeek-V4-shaped checkpoint: fastmoe_load and
    the seed path per case, beside the bf16 rows; sizes off the 32-value blocks are refused in
    one line."""
    root = tmp_path / "quant"
    options = ["--quant", "mxfp4-expert", "--experts", "8", "--hidden", "256"]
    options += ["--intermediate", "256", "--layers", "1", "--repeats", "1"]
    options += ["--dir", str(root), "--clean"]
    assert main(["bench", *options]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {root / 'mxfp4-expert'} (1 layer of 8 experts, " in out
    assert "float8_e8m0fnu scales per 32 values" in out
    for case in ("TP=1", "TP=2 rank 1", "EP=8 rank 1"):
        for path in ("fastmoe_load mxfp4-expert + scales", "seed: vLLM per-expert loop"):
            assert any(line.startswith(path) and case in line for line in out.splitlines())
    assert not root.exists()
    assert main(["bench", *options[:-3], "--hidden", "240", "--dir", str(root)]) == 1
    assert "must be multiples of 32" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_convert_refuses_per_expert_mx_clearly(releases, tmp_path, capsys, name):
    """The engines read these experts only under the releases' own per-expert names: convert
    leaves them, saying so in one line, and writes nothing."""
    out = tmp_path / "out"
    assert main(["convert", str(releases[name]), str(out)]) == 1
    err = capsys.readouterr().err
    assert "per expert with e8m0 scales per 32 values" in err, err
    assert "load them from this checkpoint" in err
    assert not out.exists() or not any(out.iterdir())
