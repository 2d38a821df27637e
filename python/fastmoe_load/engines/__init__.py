"""Inference-engine integrations: each engine's adapter describes its own FusedMoE layers as
one engine-neutral `ExpertLayerSpec` (`engines.spec`), which one filler checks whole and
fills; each engine's model loader (`load_format="fastmoe"` for vLLM, `FastMoeModelLoader`
for SGLang) fills every expert layer so and hands the rest to the model's `load_weights`.

    spec.py            the description and its filler (no engine imported)
    vllm.py            vLLM's layers as specs (no engine imported)
    vllm_model.py      where a vLLM model's expert layers are (no engine imported)
    vllm_loader.py     vLLM's model loader (imports vLLM)
    vllm_reload.py     its in-place reload (imports vLLM when a reload runs)
    sglang.py          SGLang's layers as specs (no engine imported)
    sglang_loader.py   SGLang's model loader (imports SGLang)
"""
