"""mxfp4 (gpt-oss): fused `gate_up_proj_blocks [E, 2I, H/32, 16]` uint8 (blocks of 32 e2m1
values, two a byte), `gate_up_proj_scales [E, 2I, H/32]` uint8 (e8m0), `gate_up_proj_bias
[E, 2I]` bfloat16, and down's alike, `[E, H, I/32, 16]`, `[E, H, I/32]`, `[E, H]`; gate and
up interleaved along the rows. Loaded into the parameters vLLM's `GptOssMxfp4MoEMethod`
creates and compared bit for bit with slices taken by hand (vLLM's own loader:
test_vllm_real.py)."""

from __future__ import annotations

from pathlib import Path

import fastmoe_load as fml
import pytest
import torch
from conftest import assert_bitwise_equal, assert_loads_as, group_error, seed_filled
from fastmoe_load.cli import main
from safetensors.torch import load_file, save_file
from test_quant import save

E, H, INTER = 4, 128, 64
LAYERS = 2
MX_BLOCK = 32


def prefix(layer: int = 1) -> str:
    return f"model.layers.{layer}.mlp.experts"


def gpt_oss_mxfp4(path: Path, config: bool = True, inter: int = INTER) -> Path:
    """gpt-oss as OpenAI released it: mxfp4 experts with bf16 biases, a bf16 router;
    `inter` values of intermediate size."""
    gen = torch.Generator().manual_seed(2)

    def blocks(rows: int, cols: int) -> torch.Tensor:
        shape = (E, rows, cols // MX_BLOCK, MX_BLOCK // 2)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

    def scales(rows: int, cols: int) -> torch.Tensor:  # e8m0 exponents near 2**0
        return torch.randint(
            118, 136, (E, rows, cols // MX_BLOCK), dtype=torch.uint8, generator=gen
        )

    tensors = {}
    for layer in range(LAYERS):
        experts = prefix(layer)
        tensors[f"{experts}.gate_up_proj_blocks"] = blocks(2 * inter, H)
        tensors[f"{experts}.gate_up_proj_scales"] = scales(2 * inter, H)
        tensors[f"{experts}.gate_up_proj_bias"] = torch.randn(
            E, 2 * inter, generator=gen
        ).bfloat16()
        tensors[f"{experts}.down_proj_blocks"] = blocks(H, inter)
        tensors[f"{experts}.down_proj_scales"] = scales(H, inter)
        tensors[f"{experts}.down_proj_bias"] = torch.randn(E, H, generator=gen).bfloat16()
        mlp = f"model.layers.{layer}.mlp"
        tensors[f"{mlp}.router.weight"] = torch.randn(E, H, generator=gen).bfloat16()
        tensors[f"{mlp}.router.bias"] = torch.randn(E, generator=gen).bfloat16()
    quant = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    return save(path, tensors, "gpt_oss", quant if config else None)


def gpt_oss_release(path: Path, seed: int = 0, **config) -> Path:
    """A whole tiny gpt-oss model (conftest's, `config` overriding its sizes) saved as
    OpenAI released gpt-oss: the experts as mxfp4 `_blocks` and e8m0 `_scales` (random),
    bf16 biases and everything else from the model, `quant_method: mxfp4`; another `seed`,
    other values throughout."""
    import json

    from conftest import build_model

    model = build_model("gpt_oss", seed=seed, **config)
    model.save_pretrained(path, save_original_format=True)
    with fml.open(path) as ckpt:
        tensors = {name: ckpt.tensor(name).clone() for name in ckpt.keys()}
        groups = ckpt.moe_layers()
    for file in path.glob("*.safetensors*"):
        file.unlink()
    gen = torch.Generator().manual_seed(6 + seed)
    for group in groups:
        e, h, i = group.num_experts, group.hidden_size, group.intermediate_size
        for stem, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            del tensors[f"{group.prefix}.{stem}"]
            shape = (e, rows, cols // MX_BLOCK)
            tensors[f"{group.prefix}.{stem}_blocks"] = torch.randint(
                0, 256, (*shape, MX_BLOCK // 2), dtype=torch.uint8, generator=gen
            )
            tensors[f"{group.prefix}.{stem}_scales"] = torch.randint(
                118, 136, shape, dtype=torch.uint8, generator=gen
            )
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("mxfp4"))


def stored(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def expected(
    tensors, tp_rank: int, tp: int, experts: list[int], layer: int = 1
) -> dict[str, torch.Tensor]:
    """vLLM's mxfp4 parameters sliced by hand from the stored tensors: the rank's gate rows
    (even rows of gate_up) then its up rows (odd rows), and its columns of down, in stored
    elements (bytes of two values; one scale per 32 values)."""
    shard = INTER // tp
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)

    def t(name: str) -> torch.Tensor:
        return tensors[f"{prefix(layer)}.{name}"][experts]

    def w13(gate_up: torch.Tensor) -> torch.Tensor:
        return torch.cat([gate_up[:, 0::2][:, rows], gate_up[:, 1::2][:, rows]], dim=1)

    def cols(per: int) -> slice:
        return slice(tp_rank * shard // per, (tp_rank + 1) * shard // per)

    return {
        "w13": w13(t("gate_up_proj_blocks").flatten(2)),
        "w2": t("down_proj_blocks").flatten(2)[:, :, cols(2)],
        "w13_weight_scale": w13(t("gate_up_proj_scales")),
        "w2_weight_scale": t("down_proj_scales")[:, :, cols(MX_BLOCK)],
        "w13_bias": w13(t("gate_up_proj_bias").unsqueeze(-1)).squeeze(-1),
        "w2_bias": t("down_proj_bias"),
    }


def test_detected_with_packing_and_scales(checkpoint):
    with fml.open(checkpoint) as ckpt:
        assert ckpt.unsupported_groups() == []
        assert [x.prefix for x in ckpt.moe_layers()] == [prefix(0), prefix(1)]
        layer = ckpt.experts(prefix())
        assert (layer.format, layer.num_experts, layer.hidden_size, layer.intermediate_size) == (
            "fused_interleaved",
            E,
            H,
            INTER,
        )
        assert (layer.dtype, layer.pack, layer.bias_dtype) == (torch.uint8, 2, torch.bfloat16)
        q = layer.quantization
        assert q is not None
        assert str(q) == "mxfp4, 32-value group scales in uint8 (weight_scale)"
        assert q.weights == "mxfp4"
        tensors = stored(checkpoint)
        gate_up = tensors[f"{prefix()}.gate_up_proj_blocks"].flatten(2)
        gate_up_scales = tensors[f"{prefix()}.gate_up_proj_scales"]
        for e in (0, 3):
            assert_bitwise_equal(layer.w1(e), gate_up[e, 0::2], f"w1({e})")
            assert_bitwise_equal(layer.w3(e), gate_up[e, 1::2], f"w3({e})")
            assert_bitwise_equal(
                layer.w2(e), tensors[f"{prefix()}.down_proj_blocks"][e].flatten(1), f"w2({e})"
            )
            assert_bitwise_equal(layer.w1_scale(e), gate_up_scales[e, 0::2], "w1 scale")
            assert_bitwise_equal(layer.w3_scale(e), gate_up_scales[e, 1::2], "w3 scale")
            assert_bitwise_equal(layer.w2_scale(e), tensors[f"{prefix()}.down_proj_scales"][e])
            bias = tensors[f"{prefix()}.gate_up_proj_bias"][e]
            assert_bitwise_equal(layer.b1(e), bias[0::2], "b1")
            assert_bitwise_equal(layer.b3(e), bias[1::2], "b3")


@pytest.mark.parametrize("pairs", [False, True], ids=["gate_then_up", "interleaved"])
@pytest.mark.parametrize(
    ("tp_rank", "tp", "experts"), [(0, 1, None), (1, 2, None), (0, 2, [3, 1, 3])]
)
def test_load_fused_moe_matches_hand_slices(checkpoint, tp_rank, tp, experts, pairs):
    """Gate rows then up rows, or (`w13_interleaved`) gate/up pairs as gpt-oss stores them
    and vLLM's gpt-oss layers keep them: weights, per-row scales and bias alike."""
    local = list(range(E)) if experts is None else experts
    want = expected(stored(checkpoint), tp_rank, tp, local)
    if pairs:
        want = {k: interleaved(v) if k.startswith("w13") else v for k, v in want.items()}
    assert_loads_as(
        checkpoint,
        prefix(),
        want,
        tp_rank=tp_rank,
        tp_size=tp,
        local_experts=experts,
        w13_interleaved=pairs,
    )


def test_split_that_cuts_a_block_names_the_sizes_that_fit(checkpoint):
    """I=64 at tp=4 gives 16 values a rank: half of a 32-value mxfp4 block."""
    shard = INTER // 4
    w13 = torch.full((E, 2 * shard, H // 2), 0xAB, dtype=torch.uint8)
    with fml.open(checkpoint) as ckpt, pytest.raises(fml.RequestError) as error:
        fml.load_fused_moe(
            ckpt,
            prefix(),
            w13,
            torch.empty(E, H, shard // 2, dtype=torch.uint8),
            tp_rank=0,
            tp_size=4,
        )
    message = str(error.value)
    assert "tp_size=4 gives each rank 16 of the intermediate size 64" in message
    assert "tp_size that fit: 1, 2" in message
    assert bool((w13 == 0xAB).all())


@pytest.mark.parametrize("config", ["model_type only", "none"])
def test_detected_from_the_files_alone(tmp_path, config):
    """Without a quantization_config, or any config.json, the `_blocks` and `_scales` names
    say mxfp4, and gate and up interleaved: only gpt-oss writes them, so."""
    path = gpt_oss_mxfp4(tmp_path / "ckpt", config=False)
    if config == "none":
        (path / "config.json").unlink()
    with fml.open(path) as ckpt:
        layer = ckpt.experts(prefix())
        assert layer.quantization is not None
        assert str(layer.quantization).startswith("mxfp4, 32-value group scales in uint8")
        assert layer.interleaved
        gate_up = stored(path)[f"{prefix()}.gate_up_proj_blocks"].flatten(2)
        assert_bitwise_equal(layer.w1(0), gate_up[0, 0::2], "w1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_scales", "have no scales beside them"),
        ("float_scales", "mxfp4 scales are e8m0 bytes, U8"),
        ("bad_block", "mxfp4 blocks are U8 [E, rows, cols/32, 16]"),
        ("wrong_grid", "no scale grid of its [128, 64] weight: expected [128, 2] (1"),
    ],
)
def test_malformed_mxfp4_is_a_clear_error(tmp_path, change, message):
    path = gpt_oss_mxfp4(tmp_path / "ckpt")
    tensors = stored(path)
    scales = [k for k in tensors if k.endswith("_scales")]
    if change == "no_scales":
        for k in scales:
            del tensors[k]
    elif change == "float_scales":
        for k in scales:
            tensors[k] = tensors[k].float()
    elif change == "bad_block":
        for k in [k for k in tensors if k.endswith("_blocks")]:
            tensors[k] = tensors[k].flatten(2).unflatten(2, (-1, 8))
    else:
        for k in [k for k in scales if "down" in k]:
            tensors[k] = tensors[k][:, :, :1].contiguous()
    save(path, tensors, "gpt_oss", {"quant_method": "mxfp4"})
    with fml.open(path) as ckpt:
        error = group_error(ckpt)
    assert message in error
    assert prefix(0) in error


def test_inspect_names_the_scheme(checkpoint, capsys):
    main(["inspect", "--tp", "2", str(checkpoint)])
    out = capsys.readouterr().out
    assert "quantized   mxfp4, 32-value group scales in uint8" in out
    assert f"{prefix(1)}  fused_interleaved" in out


def test_convert_refuses_mxfp4_before_writing(checkpoint, tmp_path):
    """transformers keeps gpt-oss' mxfp4 experts as released: there is nothing to convert
    them to, and the refusal comes before anything is written."""
    from fastmoe_load.cli.convert import convert

    for to in ("per_expert", "fused"):
        with pytest.raises(fml.RequestError, match="mxfp4"):
            convert(checkpoint, tmp_path / to, to=to)
        assert not (tmp_path / to).exists()


def interleaved(t: torch.Tensor) -> torch.Tensor:
    """`[n, 2s, ...]` gate rows then up rows, as gate/up pairs: vLLM's gpt-oss layout."""
    return t.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)


@pytest.mark.parametrize(("tp_rank", "tp", "experts"), [(1, 2, None), (0, 2, [3, 1, 3])])
def test_seed_path_matches_hand_slices(checkpoint, tp_rank, tp, experts):
    """The bench's pure-Python path, vLLM's gpt-oss mxfp4 loop, fills the same values, gate
    and up interleaved as vLLM's gpt-oss layers keep them (and down's bias on TP rank 0
    only)."""
    local = list(range(E)) if experts is None else experts
    want = expected(stored(checkpoint), tp_rank, tp, local)
    got = seed_filled(checkpoint, prefix(), want, tp_rank, tp, local)
    for name, tensor in want.items():
        if name.startswith("w13"):
            tensor = interleaved(tensor)
        if name == "w2_bias" and tp_rank > 0:
            tensor = torch.zeros_like(tensor)
        assert_bitwise_equal(got[name], tensor, name)


def test_quant_bench_rows(tmp_path, capsys):
    """`bench --quant mxfp4` on a tiny gpt-oss-shaped checkpoint: fastmoe_load and vLLM's
    gpt-oss loop per case, beside the bf16 rows; sizes off the 32-value blocks are refused
    in one line."""
    root = tmp_path / "quant"
    options = ["--quant", "mxfp4", "--experts", "8", "--hidden", "256", "--intermediate", "256"]
    options += ["--layers", "1", "--repeats", "1", "--dir", str(root), "--clean"]
    assert main(["bench", *options]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {root / 'mxfp4'} (1 layer of 8 experts, " in out
    for case in ("TP=1", "TP=2 rank 1", "EP=8 rank 1"):
        for path in ("fastmoe_load mxfp4 + scales", "seed: vLLM gpt-oss mxfp4 loop"):
            assert any(line.startswith(path) and case in line for line in out.splitlines())
    assert not root.exists()
    assert main(["bench", *options[:-3], "--hidden", "240", "--dir", str(root)]) == 1
    assert "must be multiples of 32" in capsys.readouterr().err


def test_bench_checkpoint_is_gpt_oss_mxfp4(tmp_path):
    """The bench's generated checkpoint is detected as the release is, and its two contenders
    fill the same values (the seed's w13 interleaved as vLLM keeps it)."""
    from fastmoe_load.bench.quant import Fp8Shape, generate_fp8

    shape = Fp8Shape(layers=1, experts=4, hidden=64, intermediate=64, scheme="mxfp4")
    generate_fp8(str(tmp_path / "ckpt"), shape)
    path = tmp_path / "ckpt"
    with fml.open(path) as ckpt:
        (layer,) = ckpt.moe_layers()
        assert layer.format == "fused_interleaved"
        assert str(layer.quantization).startswith("mxfp4, 32-value group scales in uint8")
        size = sum(ckpt.tensor(n).nbytes for n in layer.tensor_names)
    assert size == shape.layer_bytes
    (file,) = path.glob("*.safetensors")  # one shard a layer
    want = expected(load_file(file), 1, 2, [3, 0], layer=0)
    got = seed_filled(path, shape.prefix(0), want, 1, 2, [3, 0])
    for name, tensor in want.items():
        if name.startswith("w13"):
            tensor = interleaved(tensor)
        if name == "w2_bias":
            tensor = torch.zeros_like(tensor)
        assert_bitwise_equal(got[name], tensor, name)


@pytest.mark.parametrize(
    ("tp_rank", "tp", "ep_rank", "ep"), [(0, 1, 0, 1), (1, 2, 0, 1), (0, 1, 1, 2)]
)
def test_load_model_dequantizes_as_from_pretrained(tmp_path, tp_rank, tp, ep_rank, ep):
    """transformers builds gpt-oss without its mxfp4 kernels (on a CPU, or without the
    `kernels` package) and dequantizes the experts at load: `load_model` into that model
    equals `from_pretrained`, bit for bit, through transformers' own conversion; an expert
    TP or EP rank holds its slice of it (gate_up `[E, H, 2I]` with gate/up pairs along 2I,
    down `[E, I, H]`)."""
    import transformers
    from conftest import bits

    path = gpt_oss_release(tmp_path / "model", hidden_size=64, intermediate_size=64)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert not any("blocks" in n for n, _ in theirs.named_parameters())  # dequantized
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        ours = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    local = fml.expert_placement(config.num_local_experts, ep, ep_rank)
    shard = config.intermediate_size // tp
    pairs = slice(2 * tp_rank * shard, 2 * (tp_rank + 1) * shard)
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)
    slices = {  # the rank's part of each expert weight, by name
        "gate_up_proj": lambda t: t[local][:, :, pairs],
        "gate_up_proj_bias": lambda t: t[local][:, pairs],
        "down_proj": lambda t: t[local][:, rows],
        "down_proj_bias": lambda t: t[local],
    }
    expected = theirs.state_dict()
    for name, tensor in list(expected.items()):
        if ".experts." in name:
            expected[name] = slices[name.rpartition(".")[2]](tensor)
            module, _, param = name.rpartition(".")
            shape, dtype = expected[name].shape, tensor.dtype
            empty = torch.empty(shape, dtype=dtype, device="meta")
            setattr(ours.get_submodule(module), param, torch.nn.Parameter(empty))
    report = fml.load_model(
        ours,
        path,
        expert_tp_rank=tp_rank,
        expert_tp_size=tp,
        ep_rank=ep_rank,
        ep_size=ep,
        strict=True,
    )
    assert report.expert_groups == config.num_hidden_layers
    for name, tensor in ours.state_dict().items():
        assert torch.equal(bits(tensor), bits(expected[name])), name
