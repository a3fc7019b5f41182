"""Narrow shims for published remote code that the pinned transformers (4.57.6) breaks.

Each shim applies only when its quirk is detected on the loaded object, and names the public
report it answers. Breakages in the remote *generation* helpers (ChatGLM3's stream_generate and
_update_model_kwargs_for_generation: `_eos_token_tensor` on 4.43+, `_extract_past_from_model_output`
gone on 4.49+) are not shimmed: chatglm3.generate_stream_chatglm3 never calls them (it drives the
model's forward directly), so there is nothing to patch.
"""

from __future__ import annotations

import inspect

PAD_PADDING_SIDE = "https://github.com/zai-org/ChatGLM3/issues/1324"
STREAM_GENERATOR_IMPORT = "https://github.com/LowinLi/transformers-stream-generator/issues/15"


def stream_generator_import_broken() -> bool:
    """True when `import transformers_stream_generator` fails for want of transformers' top-level
    BeamSearchScorer (transformers 4.56 stopped exporting it, huggingface/transformers#40495; the class still exists)."""
    import importlib

    try:
        importlib.import_module("transformers_stream_generator")
    except ImportError as e:
        return "BeamSearchScorer" in str(e)
    return False


def fix_stream_generator_import() -> bool:
    """Qwen-7B-Chat's modeling_qwen.py imports transformers_stream_generator (inside its chat_stream
    helper, which the project never calls), and transformers checks every import of remote code
    before loading it: with the pinned 0.0.5 failing on `from transformers import BeamSearchScorer`,
    the model cannot load at all. The classes it names still live in transformers.generation; making
    them importable from the top level again lets the published package import unchanged."""
    if not stream_generator_import_broken():
        return False
    import sys

    import transformers
    from transformers.generation import beam_constraints, beam_search

    for name, owner in (("BeamSearchScorer", beam_search), ("ConstrainedBeamSearchScorer", beam_search),
                        ("DisjunctiveConstraint", beam_constraints), ("PhrasalConstraint", beam_constraints)):
        if not hasattr(transformers, name):
            setattr(transformers, name, getattr(owner, name))
    for mod in [m for m in sys.modules if m.startswith("transformers_stream_generator")]:
        del sys.modules[mod]  # the failed import left nothing usable behind
    return True


def apply_import_shims() -> list[str]:
    """Shims that must be in place before remote code is loaded; returns the issues answered."""
    return [STREAM_GENERATOR_IMPORT] if fix_stream_generator_import() else []


def pad_lacks_padding_side(tokenizer) -> bool:
    pad = getattr(type(tokenizer), "_pad", None)
    if pad is None:
        return False
    params = inspect.signature(pad).parameters
    return "padding_side" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values())


def fix_pad_padding_side(tokenizer) -> bool:
    """transformers >= 4.45 calls `_pad(..., padding_side=...)`; ChatGLM3's older
    tokenization_chatglm.py defines `_pad` without it (TypeError in build_chat_input).
    ChatGLM pads on the left by design, so the argument is accepted and must say "left" or None."""
    if not pad_lacks_padding_side(tokenizer):
        return False
    cls = type(tokenizer)
    original = cls._pad

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None, **kwargs):
        if padding_side not in (None, getattr(self, "padding_side", "left")):
            raise ValueError(f"{cls.__name__} pads on the {self.padding_side}; padding_side={padding_side!r}")
        args = {"max_length": max_length, "pad_to_multiple_of": pad_to_multiple_of,
                "return_attention_mask": return_attention_mask, **kwargs}
        if padding_strategy is not None:
            args["padding_strategy"] = padding_strategy
        return original(self, encoded_inputs, **args)

    _pad.shim_for = PAD_PADDING_SIDE
    cls._pad = _pad
    return True


def apply_tokenizer_shims(tokenizer) -> list[str]:
    """Apply every tokenizer shim whose quirk is present; returns the issues answered."""
    applied = []
    if fix_pad_padding_side(tokenizer):
        applied.append(PAD_PADDING_SIDE)
    return applied
