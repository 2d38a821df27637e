"""`DirectCopies`: the copies a model's weight loaders make from checkpoint views are made by
fastmoe_load's pipeline, with the values, order and errors of the copies they replace."""

import fastmoe_load as fml
import pytest
import torch
from fastmoe_load.direct_copies import DirectCopies, strided_runs
from safetensors.torch import save_file


def nan(shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Dense tensors with the names and dtypes of a Qwen3-MoE attention block and a router."""
    torch.manual_seed(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 32, dtype=torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(16, 32, dtype=torch.bfloat16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(32, 64, dtype=torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(8, 32, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(4, 6, 32, dtype=torch.bfloat16),
        "model.norm.weight": torch.randn(32, dtype=torch.float32),
        "model.scalar": torch.tensor(3.5, dtype=torch.float32),
    }
    path = tmp_path_factory.mktemp("dense")
    save_file(tensors, path / "model.safetensors")
    return path, tensors


def test_weight_loader_copies_are_made_by_the_pipeline(saved):
    """A TP rank's narrowings (rows, columns, a middle dimension, a fused q/k parameter, a
    whole tensor, a scalar) land bit for bit as torch's copies would, and are counted."""
    path, tensors = saved
    q, k, o = (tensors[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qko")
    qk = nan((40, 32))  # q rows 32..63 (rank 1 of 2) then k rows 8..15
    o_cols = nan((32, 32))  # o_proj's input columns 32..63
    embed = nan((4, 3, 32))  # the middle dimension narrowed
    norm, scalar = nan((32,), torch.float32), nan((), torch.float32)
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        views = dict(copies.views(ckpt.keys()))
        qk.narrow(0, 0, 32).copy_(views["model.layers.0.self_attn.q_proj.weight"].narrow(0, 32, 32))
        qk.narrow(0, 32, 8).copy_(views["model.layers.0.self_attn.k_proj.weight"].narrow(0, 8, 8))
        o_cols.copy_(views["model.layers.0.self_attn.o_proj.weight"].narrow(1, 32, 32))
        embed.copy_(views["model.embed_tokens.weight"].narrow(1, 3, 3))
        norm.copy_(views["model.norm.weight"])
        scalar.copy_(views["model.scalar"])
        # Made when the block ends, not one at a time (reading `qk` here would make them).
        assert copies.copied_bytes == 0
    assert torch.equal(qk, torch.cat([q[32:], k[8:]]))
    assert torch.equal(o_cols, o[:, 32:])
    assert torch.equal(embed, tensors["model.embed_tokens.weight"][:, 3:])
    assert torch.equal(norm, tensors["model.norm.weight"])
    assert torch.equal(scalar, tensors["model.scalar"])
    landed = sum(t.nbytes for t in (qk, o_cols, embed, norm, scalar))
    assert copies.copied_bytes == landed
    assert copies.copies_made == 6


def test_what_reads_or_writes_a_target_sees_the_copy_first(saved):
    """The order of the weight loaders' operations holds: a read of the target, a second
    write to the same bytes, a zeroing of its padding, all in program order."""
    path, tensors = saved
    gate = tensors["model.layers.0.mlp.gate.weight"]
    dst = nan((8, 32))
    padded = nan((10, 32))
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        view = dict(copies.views(ckpt.keys()))["model.layers.0.mlp.gate.weight"]
        dst.copy_(view)
        total = dst.float().sum()  # reads the target: the copy is made first
        dst[0].copy_(view[1])  # overwrites row 0 after the whole copy
        padded[:8].copy_(view)
        padded[8:].zero_()  # other bytes of the same parameter
        padded[:1].copy_(view[7:])  # a second write of row 0, after the first
    assert total == gate.float().sum()
    assert torch.equal(dst, torch.cat([gate[1:2], gate[1:]]))
    zeros = torch.zeros(2, 32, dtype=gate.dtype)
    assert torch.equal(padded, torch.cat([gate[7:], gate[1:], zeros]))
    assert copies.copied_bytes > 0


def test_other_copies_run_as_torch_runs_them(saved):
    """A strided destination, a computed source, another shape (broadcast) or a dtype
    conversion: the values torch gives, the first three made by torch itself."""
    path, tensors = saved
    o = tensors["model.layers.0.self_attn.o_proj.weight"]
    strided = nan((64, 32)).t()
    computed = nan((32, 64))
    broadcast = nan((2, 64))
    widened = nan((32, 64), torch.float32)
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        view = dict(copies.views(ckpt.keys()))["model.layers.0.self_attn.o_proj.weight"]
        strided.copy_(view)
        computed.copy_(view * 2)
        broadcast.copy_(view[0])
        made_by_torch = copies.copied_bytes
        widened.copy_(view)  # converted as copy_ converts, through the pipeline
    assert made_by_torch == 0
    assert torch.equal(strided, o)
    assert torch.equal(computed, o * 2)
    assert torch.equal(broadcast, o[0].expand(2, 64))
    assert torch.equal(widened, o.float())
    assert (copies.copied_bytes, copies.copies_made) == (o.nbytes, 1)


def test_an_error_inside_drops_the_copies_not_made(saved):
    path, _ = saved
    dst = nan((8, 32))
    with pytest.raises(KeyError), fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        dst.copy_(dict(copies.views(ckpt.keys()))["model.layers.0.mlp.gate.weight"])
        raise KeyError("a weight loader failed")
    assert dst.isnan().all()
    assert copies.copied_bytes == 0


def test_a_checkpoint_rewritten_before_the_copies_is_refused(saved, tmp_path):
    path, tensors = saved
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    dst = nan((8, 32))
    with pytest.raises(fml.FileChangedError, match=r"model\.safetensors"):
        with fml.open(tmp_path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
            dst.copy_(dict(copies.views(ckpt.keys()))["model.layers.0.mlp.gate.weight"])
            rewritten = {name: torch.zeros_like(t) for name, t in tensors.items()}
            save_file(rewritten, tmp_path / "model.safetensors")  # rewritten in place
    assert dst.isnan().all()


@pytest.mark.parametrize(
    ("make", "runs"),
    [
        (lambda t: t, {"rows": 1, "cols": 24, "row_stride": 24}),
        (lambda t: t[1:3], {"rows": 1, "cols": 12, "row_stride": 12}),
        (lambda t: t[:, 1:], {"rows": 2, "cols": 8, "row_stride": 12}),
        (lambda t: t[:, :, 2:], {"rows": 6, "cols": 2, "row_stride": 4}),
        (lambda t: t[0, 0, 0], {"rows": 1, "cols": 1, "row_stride": 1}),
        (lambda t: t[:1, 1:2], {"rows": 1, "cols": 4, "row_stride": 4}),
        (lambda t: t.transpose(1, 2), None),
        (lambda t: t[:, 1:, 1:], None),
        (lambda t: t[0, 0].expand(3, 4), None),
        (lambda t: t[:, :, ::2], {"rows": 12, "cols": 1, "row_stride": 2}),
        (lambda t: t.view(4, 6)[:, 5:], {"rows": 4, "cols": 1, "row_stride": 6}),
        (lambda t: t[:, :, ::2][:, 1:], None),
    ],
)
def test_strided_runs(make, runs):
    """Views of a [2, 3, 4] tensor as rows of contiguous elements, where they are."""
    view = make(torch.arange(24).view(2, 3, 4))
    assert strided_runs(view) == runs


def test_a_view_the_loader_wrote_into_is_copied_as_written(tmp_path):
    """Weight loaders that change the checkpoint's tensor before copying it (SGLang's Gemma
    adds 1 to its norms; gpt-oss zeroes the down-projection bias on all TP ranks but the
    first): the copy holds the changed values, as torch's would; a copy made before the
    change holds the file's."""
    norm = torch.full((4,), 0.5, dtype=torch.bfloat16)
    bias = torch.full((4,), 2.0, dtype=torch.bfloat16)
    save_file({"norm.weight": norm, "w2_bias": bias}, tmp_path / "model.safetensors")
    before, after, zeroed = nan((4,)), nan((4,)), nan((4,))
    with fml.open(tmp_path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        views = dict(copies.views(ckpt.keys()))
        before.copy_(views["norm.weight"])
        views["norm.weight"] += 1.0
        after.copy_(views["norm.weight"])
        views["w2_bias"][1:].zero_()
        zeroed.copy_(views["w2_bias"])
    assert before.tolist() == [0.5] * 4
    assert after.tolist() == [1.5] * 4
    assert zeroed.tolist() == [2.0, 0.0, 0.0, 0.0]
    assert copies.copies_made == 1  # the copy made before any change


def test_views_as_other_elements_run_as_torch_runs_them(saved):
    """A view of the tensor's bytes as another dtype (narrower or wider elements), and
    conjugate or negative views: the values torch gives, and nothing written past the
    destination."""
    path, tensors = saved
    gate = tensors["model.layers.0.mlp.gate.weight"]
    narrower = torch.zeros(2, 8 * 32 * 2, dtype=torch.uint8)
    wider = torch.zeros(2, 8, 16, dtype=torch.float32)
    negated = nan((32,), torch.float32)
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies:
        views = dict(copies.views(ckpt.keys()))
        narrower[0].copy_(views["model.layers.0.mlp.gate.weight"].view(torch.uint8).view(-1))
        wider[0].copy_(views["model.layers.0.mlp.gate.weight"].view(torch.float32))
        negated.copy_(torch._neg_view(views["model.norm.weight"]))
    assert torch.equal(narrower[0], gate.view(torch.uint8).view(-1))
    assert torch.equal(wider[0], gate.view(torch.float32))
    assert not narrower[1].any() and not wider[1].any()
    assert torch.equal(negated, -tensors["model.norm.weight"])
    assert copies.copies_made == 0


def test_reads_under_inference_mode_see_the_copies(saved):
    """Under `torch.inference_mode()`, `float()` and `contiguous()` of a target reach the
    mode as operators that may alias their input, yet copy it: the copies are made first."""
    path, tensors = saved
    gate = tensors["model.layers.0.mlp.gate.weight"]
    dst = nan((8, 32))
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu") as copies, torch.inference_mode():
        dst.copy_(dict(copies.views(ckpt.keys()))["model.layers.0.mlp.gate.weight"])
        widened = dst.float()
        transposed = dst.t().contiguous()
    assert torch.equal(widened, gate.float())
    assert torch.equal(transposed, gate.t().contiguous())


def test_blocks_do_not_nest(saved):
    path, _ = saved
    with fml.open(path) as ckpt, DirectCopies(ckpt, "cpu"):
        with pytest.raises(RuntimeError, match="DirectCopies blocks do not nest"):
            with DirectCopies(ckpt, "cpu"):
                pass
