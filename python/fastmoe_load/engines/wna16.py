"""GPTQ and AWQ experts as vLLM's `MoeWNA16Method` keeps them, and the conversion into that
layout from the checkpoint's own values.

vLLM picks `MoeWNA16Method` for GPTQ and AWQ experts where its Marlin methods cannot serve
the layer (`check_moe_marlin_supports_layer`: I/tp not on whole groups, H not a multiple of
128, a group size Marlin lacks; always on ROCm), or when asked for `quantization="moe_wna16"`.
Its parameters are output-first bytes, whatever the checkpoint's packing (vLLM 0.33 and
0.34, `quantization/moe_wna16.py`, `create_weights` and `moe_wna16_weight_loader`), for
`n` local experts, the rank's `c = I/tp` rows and the served group `g`:

- `w13_qweight [n, 2c, H/p]`, `w2_qweight [n, H, c/p]` uint8, `p = 8 / bits` values a byte,
  the lower nibble the even input (int8: one value a byte). GPTQ's `qweight [in/(32/bits),
  out]` int32 transposed, its bytes taken as they lie; AWQ's `qweight [in, out/8]` unpacked
  from its 0, 4, 1, 5, 2, 6, 3, 7 order, transposed and packed two inputs a byte;
- `w13_scales [n, 2c, H/g]`, `w2_scales [n, H, c/g]` in the model's dtype: the checkpoint's
  `scales [in/group, out]` transposed (converted by `copy_`);
- `w13_qzeros [n, 2c/p, H/g]`, `w2_qzeros [n, H/p, c/g]` uint8, only where the config has
  zero points (GPTQ `sym: false`, AWQ `zero_point: true`; symmetric GPTQ's are dropped, and
  vLLM registers empty placeholders): the zero points two outputs a byte, lower nibble the
  even output; GPTQ's get one added to each value (GPTQ stores them less one), in uint8
  arithmetic, wrapping as vLLM's does.

Where `c` or `H` is not a multiple of the checkpoint's group, vLLM halves the group until
both are (`group_size_div_factor`, never under 32) and repeats each scale and zero point over
the halves.

Zero points under expert or data parallelism: vLLM's loader of `w13_qzeros`/`w2_qzeros`
writes them by global expert id where its weights and scales go to the local slot, and slices
them by the attention TP rank (`get_tensor_model_parallel_rank`) where the weights and scales
take the layer's MoE TP rank. On an EP rank that indexes past the rank's slots (vLLM 0.33 and
0.34 fail with an `IndexError`, or overwrite another slot's), and with TP across DP ranks
takes another rank's rows. Here each slot's zero points are those of its expert and of the
layer's MoE TP rank, as vLLM's loading of a layer holding every expert writes them.

fastmoe_load reads each rank's values input-first, as stored (`load_fused_moe(...,
k_first=True, shard=...)`, every group the rows touch), into scratch on the parameters'
device, and converts them there (`Wna16.convert`), a few experts at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import MoeLayer

# AWQ (GEMM) packs eight outputs an int32 in this order: entry k of an int32 holds output
# AWQ_ORDER[k] (`reverse_awq_pack_order` in vLLM, AutoAWQ's `AWQ_ORDER` inverted).
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
# Checkpoint values converted at once: the conversion holds a few times as much beside them.
CONVERT_BYTES = 64 << 20


def served_group(group: int, rows: int, hidden: int) -> int | None:
    """The group vLLM's `MoeWNA16Method.create_weights` serves a checkpoint group with, for a
    rank of `rows` rows of the intermediate size: halved until it divides `rows` and
    `hidden`, or None where it would fall under 32 (vLLM asserts)."""
    while rows % group or hidden % group:
        group //= 2
        if group < 32:
            return None
    return group


def wna16_tp_sizes(intermediate: int, hidden: int, group: int, up_to: int = 64) -> list[int]:
    """The TP sizes up to `up_to` whose even split vLLM's `MoeWNA16Method` can serve."""
    return [
        tp
        for tp in range(1, up_to + 1)
        if intermediate % tp == 0 and served_group(group, intermediate // tp, hidden)
    ]


@dataclass(frozen=True)
class Wna16:
    """How a `MoeWNA16Method` layer keeps GPTQ or AWQ experts (see the module docstring).

    - `method`: the checkpoint format it converts, `gptq` or `awq` (vLLM's
      `linear_quant_method`, `awq_marlin` read as `awq`).
    - `bits`: 4 or 8 (AWQ: 4).
    - `group_size`: the served group (the layer's `group_size`), the checkpoint's divided by
      vLLM's `group_size_div_factor`.
    - `zero_points`: the layer has `w13_qzeros`/`w2_qzeros` (its config's `has_zp`).
    """

    method: str
    bits: int
    group_size: int
    zero_points: bool

    @property
    def pack(self) -> int:
        """Values a byte of `w13_qweight` and `w13_qzeros`."""
        return 8 // self.bits

    def destinations(self) -> tuple[str, ...]:
        """The destinations filled, by `load_fused_moe`'s names."""
        names = ("w13", "w2", "w13_scales", "w2_scales")
        return (*names, "w13_qzeros", "w2_qzeros") if self.zero_points else names

    def shapes(self, experts: int, hidden: int, rows: int) -> dict[str, tuple[int, ...]]:
        """The parameters' shapes for `experts` local experts and `rows` rows a rank."""
        n, p, g = experts, self.pack, self.group_size
        shapes = {
            "w13": (n, 2 * rows, hidden // p),
            "w2": (n, hidden, rows // p),
            "w13_scales": (n, 2 * rows, hidden // g),
            "w2_scales": (n, hidden, rows // g),
            "w13_qzeros": (n, 2 * rows // p, hidden // g),
            "w2_qzeros": (n, hidden // p, rows // g),
        }
        return {name: shapes[name] for name in self.destinations()}

    def problem(self, group: MoeLayer, rows: int) -> str | None:
        """Why the layer cannot take `group`'s experts with `rows` rows a rank: another
        format or width than the checkpoint's, a served group that does not divide the
        checkpoint's, the rows or H (naming the TP sizes that fit), or None."""
        quantization = group.quantization
        if quantization is None or quantization.method != self.method:
            return f"the layer converts {self.method} experts, the checkpoint's are {quantization}"
        if quantization.weights != f"int{self.bits}":
            return (
                f"the layer takes int{self.bits} {self.method} experts, the checkpoint's are "
                f"{quantization.weights}"
            )
        checkpoint = checkpoint_group_size(group)
        g = self.group_size
        if checkpoint % g:
            return (
                f"the layer's {g}-value groups do not divide the checkpoint's {checkpoint}-value "
                "groups"
            )
        if rows % g or group.hidden_size % g:
            fit = wna16_tp_sizes(group.intermediate_size, group.hidden_size, checkpoint)
            return (
                f"{g}-value groups do not divide the rank's {rows} rows of I="
                f"{group.intermediate_size} and H={group.hidden_size}; MoeWNA16Method serves "
                f"tp_size {', '.join(map(str, fit))}"
            )
        return None

    def convert(
        self,
        name: str,
        loaded: torch.Tensor,
        target: torch.Tensor,
        first: int,
        group: MoeLayer,
    ) -> None:
        """Writes `loaded`, the rank's values of destination `name` of `group`'s experts as
        `load_fused_moe(..., k_first=True, shard=(first, c))` leaves them (input-first, every
        checkpoint group the rows touch), into `target`, the layer's parameter, a few experts
        at a time, as vLLM's `moe_wna16_weight_loader` converts them (`problem` checked)."""
        checkpoint_group = checkpoint_group_size(group)
        per_expert = loaded[0].nbytes if len(loaded) else 1
        step = max(1, CONVERT_BYTES // max(per_expert, 1))
        with torch.no_grad():
            for k in range(0, loaded.shape[0], step):
                part = target[k : k + step]
                part.copy_(
                    self._converted(name, loaded[k : k + step], part, first, checkpoint_group)
                )

    def _converted(
        self,
        name: str,
        loaded: torch.Tensor,
        target: torch.Tensor,
        first: int,
        checkpoint_group: int,
    ) -> torch.Tensor:
        if name in ("w13", "w2"):
            return self._weights(loaded)
        kind = name.split("_", 1)[1]
        values = loaded.transpose(1, 2) if kind == "scales" else self._zero_points(loaded)
        div = checkpoint_group // self.group_size
        if div > 1:
            values = values.repeat_interleave(div, dim=2)
        if name.startswith("w2"):  # the rank's (halved) groups, of every group its rows touch
            at = (first % checkpoint_group) // self.group_size
            values = values[:, :, at : at + target.shape[2]]
        return values

    def _weights(self, loaded: torch.Tensor) -> torch.Tensor:
        """`[n, in/(32/bits), out]` int32 (GPTQ) or `[n, in, out/8]` (AWQ) to `[n, out,
        in/p]` uint8."""
        if self.method == "gptq":
            return loaded.transpose(1, 2).contiguous().view(torch.uint8)
        values = _awq_unpacked(loaded).transpose(1, 2)  # [n, out, in], one value a byte
        return values[:, :, 1::2] * 16 + values[:, :, ::2]

    def _zero_points(self, loaded: torch.Tensor) -> torch.Tensor:
        """`[n, in/group, out/(32/bits)]` int32 to `[n, out/p, in/group]` uint8."""
        if self.method == "awq":
            values = _awq_unpacked(loaded).transpose(1, 2)  # [n, out, in/group]
            return values[:, 1::2] * 16 + values[:, ::2]
        points = loaded.view(torch.uint8)
        if self.bits == 8:
            return points.transpose(1, 2) + 1
        nibbles = (points[..., None] >> _shifts(points.device)) & 0xF
        nibbles = nibbles + 1  # GPTQ stores each zero point less one; 15 + 1 wraps in a byte
        return (nibbles[..., 0] + nibbles[..., 1] * 16).transpose(1, 2)


def checkpoint_group_size(group: MoeLayer) -> int:
    """The group size of `group`'s scales (0 where it has none)."""
    block = group.quantization.block_size if group.quantization is not None else None
    return block[1] if block is not None else 0


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor([0, 4], dtype=torch.uint8, device=device)


def _awq_unpacked(loaded: torch.Tensor) -> torch.Tensor:
    """AWQ's `[n, a, b]` int32, eight 4-bit outputs each in `AWQ_ORDER`, as `[n, a, 8b]`
    uint8 values in output order."""
    n, a, b = loaded.shape
    nibbles = (loaded.view(torch.uint8)[..., None] >> _shifts(loaded.device)) & 0xF
    return nibbles.reshape(n, a, b, 8)[..., list(AWQ_ORDER)].reshape(n, a, 8 * b)
