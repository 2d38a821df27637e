"""SGLang 0.5.23's expert loading, re-implemented for the tests of `fastmoe_load.engines.sglang`
where SGLang's own layers cannot be built (see `test_sglang.py`).

`ReferenceFusedMoE` keeps the attributes `fastmoe_load.engines.sglang` reads, named and set as
`sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__` sets them, and copies the
code path that fills unquantized weights on a GPU (not padded, not pre-sharded, no
triton-kernels or FlashInfer TRT-LLM layouts): `weight_loader` (expert placement through
`_map_global_expert_id_to_local_expert_id` or the expert-location metadata's
`logical_to_all_physical`), `_weight_loader_impl`, `_load_w13`, `_load_w2` and
`weight_loader_fused`. `load_like_sglang` feeds it checkpoint tensors as the models'
`load_weights` do: per-expert names through `FusedMoE.make_expert_params_mapping` (Qwen3-MoE,
Qwen2-MoE, DeepSeek, Mixtral), gpt-oss's fused `gate_up_proj`/`down_proj` transposed into
`weight_loader_fused`, its biases too (`w2` bias zeroed off TP rank 0).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch


class UnquantizedFusedMoEMethod:
    """Stands for SGLang's class of that name (`fastmoe_load.engines.sglang` checks the name)."""


# Stand-ins for SGLang's quantized MoE methods (the adapter reads their class names and these
# attributes), each with the parameters its `create_weights` registers for a layer of `n`
# local slots, `p` slots in all, hidden size `h` and `i` intermediate rows per TP rank:
# name -> (shape, dtype).
class Fp8MoEMethod:
    block_quant, use_mxfp8, is_fp4_expert = True, False, False

    @staticmethod
    def parameters(n: int, p: int, h: int, i: int) -> dict:
        return {
            "w13_weight": ((n, 2 * i, h), torch.float8_e4m3fn),
            "w2_weight": ((n, h, i), torch.float8_e4m3fn),
            "w13_weight_scale_inv": ((n, 2 * -(-i // 128), -(-h // 128)), torch.float32),
            "w2_weight_scale_inv": ((n, -(-h // 128), -(-i // 128)), torch.float32),
        }


class ModelOptNvFp4FusedMoEMethod:
    quant_config = SimpleNamespace(is_checkpoint_nvfp4_serialized=True)

    @staticmethod
    def parameters(n: int, p: int, h: int, i: int) -> dict:
        return {
            "w13_weight": ((n, 2 * i, h // 2), torch.uint8),
            "w2_weight": ((n, h, i // 2), torch.uint8),
            "w13_weight_scale": ((n, 2 * i, h // 16), torch.float8_e4m3fn),
            "w2_weight_scale": ((n, h, i // 16), torch.float8_e4m3fn),
            "w13_weight_scale_2": ((n, 2), torch.float32),
            "w2_weight_scale_2": ((n,), torch.float32),
            "w13_input_scale": ((p, 2), torch.float32),  # every physical expert's
            "w2_input_scale": ((p,), torch.float32),
        }


class CompressedTensorsWNA16MoE:
    strategy, actorder = "group", None

    @staticmethod
    def parameters(n: int, p: int, h: int, i: int) -> dict:
        return {  # input-first (`is_transposed`), int4 in int32, 32-value groups
            "w13_weight_packed": ((n, h // 8, 2 * i), torch.int32),
            "w2_weight_packed": ((n, i // 8, h), torch.int32),
            "w13_weight_scale": ((n, h // 32, 2 * i), torch.bfloat16),
            "w2_weight_scale": ((n, i // 32, h), torch.bfloat16),
            "w2_weight_shape": ((n, 2), torch.float32),
            "w13_weight_shape": ((n, 2), torch.float32),
        }


class Mxfp4MoEMethod:
    @staticmethod
    def parameters(n: int, p: int, h: int, i: int) -> dict:
        return {
            "w13_weight": ((n, 2 * i, h // 2), torch.uint8),
            "w13_weight_scale": ((n, 2 * i, h // 32), torch.uint8),
            "w13_weight_bias": ((n, 2 * i), torch.bfloat16),
            "w2_weight": ((n, h, i // 2), torch.uint8),
            "w2_weight_scale": ((n, h, i // 32), torch.uint8),
            "w2_weight_bias": ((n, h), torch.bfloat16),
        }


QUANTIZED_METHODS = {
    "fp8-block": Fp8MoEMethod,
    "nvfp4": ModelOptNvFp4FusedMoEMethod,
    "int4": CompressedTensorsWNA16MoE,
    "mxfp4": Mxfp4MoEMethod,
}


class ExpertLocation:
    """SGLang's `ExpertLocationMetadata`, reduced to what loading reads: the physical ->
    logical map per layer and its inverse (`logical_to_all_physical`, physical ids in
    increasing order, as `init_by_mapping` builds it)."""

    def __init__(self, physical_to_logical: list[list[int]]) -> None:
        self.physical_to_logical_map_cpu = torch.tensor(physical_to_logical)

    def logical_to_all_physical(self, layer_id: int, logical: int) -> list[int]:
        if layer_id >= self.physical_to_logical_map_cpu.shape[0]:
            return [logical]
        row = self.physical_to_logical_map_cpu[layer_id].tolist()
        return [p for p, e in enumerate(row) if e == logical]


class ReferenceFusedMoE(torch.nn.Module):
    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        layer_id: int = 0,
        tp_rank: int = 0,
        tp_size: int = 1,
        ep_rank: int = 0,
        ep_size: int = 1,
        num_fused_shared_experts: int = 0,
        with_bias: bool = False,
        location: ExpertLocation | None = None,
        dtype: torch.dtype = torch.bfloat16,
        scheme: str | None = None,
    ) -> None:
        super().__init__()
        # As FusedMoE.__init__ (num_experts counts physical experts and shared slots).
        self.layer_id = layer_id
        self.num_experts = num_experts
        self.uses_expert_location = True
        self.num_fused_shared_experts = num_fused_shared_experts
        self.moe_ep_size, self.moe_ep_rank = ep_size, ep_rank
        self.moe_tp_size, self.moe_tp_rank = tp_size, tp_rank
        self._num_global_routed = num_experts - num_fused_shared_experts
        self._expert_storage_rank = ep_rank
        self._num_local_routed = self._num_global_routed // ep_size
        self.num_local_experts = self._num_local_routed + num_fused_shared_experts
        self._has_fused_shared = num_fused_shared_experts > 0
        self.intermediate_size_per_partition = intermediate_size // tp_size
        self.use_presharded_weights = False
        self.use_triton_kernels = False
        self.use_flashinfer_trtllm_moe = False
        self.use_padded_loading = False
        self.weight_load_method = None
        self.moe_runner_config = SimpleNamespace(is_gated=True)
        self.quant_method = UnquantizedFusedMoEMethod()
        self.location = location  # get_global_expert_location_metadata() in SGLang
        self.scheme = None  # compressed-tensors' per-layer scheme in SGLang
        if scheme is not None:
            method = QUANTIZED_METHODS[scheme]()
            self.quant_method = method
            if scheme == "int4":  # SGLang's CompressedTensorsFusedMoEMethod holds it
                self.quant_method, self.scheme = SimpleNamespace(), method
            shapes = method.parameters(
                self.num_local_experts,
                num_experts,
                hidden_size,
                intermediate_size // tp_size,
            )
            for name, (shape, kind) in shapes.items():
                data = torch.empty(shape, dtype=kind)
                if data.is_floating_point() and data.element_size() > 1:
                    data.fill_(float("nan"))
                else:
                    data.view(torch.uint8).fill_(0xA5)
                self.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
            return
        # As UnquantizedFusedMoEMethod.create_weights, poisoned.
        n, shard = self.num_local_experts, self.intermediate_size_per_partition
        nan = float("nan")
        self.w13_weight = torch.nn.Parameter(
            torch.full((n, 2 * shard, hidden_size), nan, dtype=dtype), requires_grad=False
        )
        self.w2_weight = torch.nn.Parameter(
            torch.full((n, hidden_size, shard), nan, dtype=dtype), requires_grad=False
        )
        if with_bias:
            self.w13_weight_bias = torch.nn.Parameter(
                torch.full((n, 2 * shard), nan), requires_grad=False
            )
            self.w2_weight_bias = torch.nn.Parameter(
                torch.full((n, hidden_size), nan), requires_grad=False
            )

    # ---- FusedMoE, sglang/srt/layers/moe/fused_moe_triton/layer.py ----

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        start_idx = self._expert_storage_rank * self._num_local_routed
        end_idx = start_idx + self._num_local_routed
        if start_idx <= expert_id < end_idx:
            return expert_id - start_idx
        elif self._has_fused_shared and expert_id >= self._num_global_routed:
            return expert_id - self._num_global_routed + self._num_local_routed
        else:
            return -1

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id) -> None:
        metadata = self.location if self.uses_expert_location else None
        if metadata is None:
            expert_id = self._map_global_expert_id_to_local_expert_id(expert_id)
            if expert_id == -1:
                return
            self._weight_loader_impl(param, loaded_weight, weight_name, shard_id, expert_id)
            return
        for physical_expert_id in metadata.logical_to_all_physical(self.layer_id, expert_id):
            local = self._map_global_expert_id_to_local_expert_id(physical_expert_id)
            if local < 0 or local >= self.num_local_experts:
                continue
            self._weight_loader_impl(param, loaded_weight, weight_name, shard_id, local)

    def _weight_loader_impl(self, param, loaded_weight, weight_name, shard_id, expert_id):
        assert shard_id in ("w1", "w2", "w3")
        shard_dim = {"w1": 0, "w2": 1, "w3": 0}[shard_id]
        expert_data = param.data[expert_id]
        assert "weight" in weight_name
        if shard_id == "w2":
            self._load_w2(expert_data, shard_dim, shard_id, loaded_weight)
        else:
            self._load_w13(expert_data, shard_dim, shard_id, loaded_weight)

    def _load_w13(self, expert_data, shard_dim, shard_id, loaded_weight, is_bias=False):
        if is_bias:
            shard_dim = -1
        if shard_id in {"w1", "w3"}:
            shard_size = expert_data.shape[shard_dim] // 2
        else:  # w13, fused
            shard_size = expert_data.shape[shard_dim]
        start = shard_size if shard_id == "w3" else 0
        loaded_shard_size = loaded_weight.shape[shard_dim] // self.moe_tp_size
        loaded_weight = loaded_weight.narrow(
            shard_dim, loaded_shard_size * self.moe_tp_rank, loaded_shard_size
        )
        expert_data = expert_data.narrow(shard_dim, start, shard_size)
        expert_data.copy_(loaded_weight)

    def _load_w2(self, expert_data, shard_dim, shard_id, loaded_weight, is_bias=False):
        if not is_bias:
            loaded_shard_size = loaded_weight.shape[shard_dim] // self.moe_tp_size
            loaded_weight = loaded_weight.narrow(
                shard_dim, loaded_shard_size * self.moe_tp_rank, loaded_shard_size
            )
        expert_data.copy_(loaded_weight)

    def weight_loader_fused(self, param, loaded_weight, weight_name, shard_id) -> None:
        assert shard_id in ("w13", "w2")
        shard_dim = {"w13": 1, "w2": 2}[shard_id]
        expert_data = param.data
        is_bias = expert_data.dim() == 2
        assert "weight" in weight_name
        if shard_id == "w2":
            self._load_w2(expert_data, shard_dim, shard_id, loaded_weight, is_bias)
        else:
            self._load_w13(expert_data, shard_dim, shard_id, loaded_weight, is_bias)

    @classmethod
    def make_expert_params_mapping(cls, gate: str, down: str, up: str, num_experts: int):
        return [
            (
                "experts.w13_" if weight_name in [gate, up] else "experts.w2_",
                f"experts.{expert_id}.{weight_name}.",
                expert_id,
                shard_id,
            )
            for expert_id in range(num_experts)
            for shard_id, weight_name in [("w1", gate), ("w2", down), ("w3", up)]
        ]


def load_like_sglang(
    layer: ReferenceFusedMoE, tensors: dict[str, torch.Tensor], num_experts: int
) -> None:
    """`tensors` (checkpoint name -> tensor, one layer's experts) into `layer`, as SGLang's
    model `load_weights` hand them to it."""
    params = {"experts.w13_weight": layer.w13_weight, "experts.w2_weight": layer.w2_weight}
    if hasattr(layer, "w13_weight_bias"):
        params["experts.w13_weight_bias"] = layer.w13_weight_bias
        params["experts.w2_weight_bias"] = layer.w2_weight_bias
    if not any(re.search(r"\.experts\.\d+\.", name) for name in tensors):  # gpt-oss
        fused = [
            ("experts.w13_weight", "experts.gate_up_proj", "w13"),
            ("experts.w13_weight_bias", "experts.gate_up_proj_bias", "w13"),
            ("experts.w2_weight", "experts.down_proj", "w2"),
            ("experts.w2_weight_bias", "experts.down_proj_bias", "w2"),
        ]
        for name, loaded in sorted(tensors.items()):
            for param_name, weight_name, shard_id in fused:
                if not name.endswith(weight_name):
                    continue
                if "bias" not in param_name:
                    loaded = loaded.transpose(-2, -1)
                if param_name == "experts.w2_weight_bias" and layer.moe_tp_rank != 0:
                    loaded = loaded.clone().zero_()
                layer.weight_loader_fused(params[param_name], loaded, param_name, shard_id)
                break
        return
    names = (
        ("w1", "w2", "w3")
        if any(".w1." in n for n in tensors)
        else ("gate_proj", "down_proj", "up_proj")
    )
    mapping = layer.make_expert_params_mapping(names[0], names[1], names[2], num_experts)
    for name, loaded in tensors.items():
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name not in name:
                continue
            param = params[param_name + "weight"]
            layer.weight_loader(param, loaded, param_name + "weight", shard_id, expert_id)
            break
