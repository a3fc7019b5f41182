"""What a loaded model's forward accepts beyond the plain inputs, asked by the decode loop (batching.py), prefill
(prefill.py) and the prefix cache (prefix_cache.py)."""

from __future__ import annotations


def takes_ready_mask(model) -> bool:
    """Whether decode steps may give the model a ready 4D boolean mask instead of the 2D one (and
    whether prefill may compute a common beginning of prompts once: that takes a 2D mask with a gap
    and explicit positions over a cache, engine/prefill.py).

    For a batch with padded rows, transformers builds the 4D mask again at every forward
    (create_causal_mask, a vmap over the batch); a 4D mask is used as it is. Interleaved runs of
    4 padded SmolLM2 rows: 89 ms a step with the 2D mask, 75 ms with the ready one, 78 ms with no
    padding at all. Only native transformers models on SDPA take it that way (SDPA reads a boolean
    mask as "may attend"): remote-code models (Qwen-7B-Chat's QWenLMHeadModel) build their own
    mask from a 2D one, eager attention wants an additive float mask, and a sliding window would
    be lost.
    """
    cfg = model.config
    sliding = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return (type(model).__module__.startswith("transformers.models.")
            and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and not sliding and "sliding_attention" not in (getattr(cfg, "layer_types", None) or ()))
