"""GGUF -> bf16 safetensors checkpoint: read the GGUF header, build the tokenizer, dequantize, save, verify.

torch, transformers, tokenizers and gguf are imported inside the functions: importing this module stays cheap,
so a run that finds every checkpoint in place never pays for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddedModelError
from .progress import Log
from .sources import ModelSource


@dataclass(frozen=True)
class GGUFInfo:
    """What the conversion needs from the GGUF header (read with the `gguf` package, the ground truth)."""

    architecture: str
    context_length: int
    rope_theta: float
    chat_template: str | None
    tokenizer_model: str
    pre_tokenizer: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    # Bits per weight of the input embedding and of the separate output matrix (None: the GGUF has no
    # output.weight, i.e. lm_head is tied to the embedding).
    embedding_bits: float
    output_bits: float | None


def read_gguf_info(path: Path) -> GGUFInfo:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def get(key: str, default=None):
        return fields[key].contents() if key in fields else default

    arch = get("general.architecture")
    bits = {t.name: _bits_per_weight(t) for t in reader.tensors if t.name in ("token_embd.weight", "output.weight")}
    return GGUFInfo(
        architecture=arch,
        context_length=int(get(f"{arch}.context_length")),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        chat_template=get("tokenizer.chat_template"),
        tokenizer_model=get("tokenizer.ggml.model"),
        pre_tokenizer=get("tokenizer.ggml.pre", "default"),
        tokens=tuple(get("tokenizer.ggml.tokens")),
        token_types=tuple(get("tokenizer.ggml.token_type")),
        merges=tuple(get("tokenizer.ggml.merges", ())),
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        embedding_bits=bits["token_embd.weight"],
        output_bits=bits.get("output.weight"),
    )


def _bits_per_weight(tensor) -> float:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return type_size * 8 / block


# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# Pre-tokenizer regexes, the same splits llama.cpp applies for each `tokenizer.ggml.pre` value.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit is its own piece, then the GPT-2 split (llama.cpp: "\p{N}" + the GPT-2 regex).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if pre in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise EmbeddedModelError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter")


def build_tokenizer(info: GGUFInfo):
    """A fast tokenizer built directly from the GGUF vocabulary.

    Not transformers' GGUF tokenizer conversion: in 4.57.6 it gives SmolLM2 eos_token=<|im_start|> (bos and
    eos swapped), prepends <|im_start|> to every encode although the GGUF says add_bos_token=false, misses
    SmolLM's digit split and saves a copy of the whole GGUF as tokenizer.model; for Qwen2 it registers only
    3 of the 22 added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import GPT2TokenizerFast, Qwen2TokenizerFast

    if info.tokenizer_model != "gpt2":
        raise EmbeddedModelError(f"GGUF tokenizer model {info.tokenizer_model!r} is not supported (BPE 'gpt2' only)")
    # UNUSED entries are llama.cpp's [PAD...] fillers up to the embedding size; upstream has no such tokens.
    vocab = {t: i for i, (t, k) in enumerate(zip(info.tokens, info.token_types, strict=True)) if k != _UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in info.merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False))
    if info.pre_tokenizer == "qwen2":
        tk.normalizer = normalizers.NFC()  # as upstream Qwen2's tokenizer.json
    tk.pre_tokenizer = _pre_tokenizer(info.pre_tokenizer)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if info.add_bos:
        bos = info.tokens[info.bos_id]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, info.bos_id)]
        )
    kinds = list(zip(info.tokens, info.token_types, strict=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])

    def tok(i: int | None) -> str | None:
        return info.tokens[i] if i is not None else None

    cls = Qwen2TokenizerFast if info.architecture.startswith("qwen") else GPT2TokenizerFast
    return cls(
        tokenizer_object=tk,
        bos_token=tok(info.bos_id),
        eos_token=tok(info.eos_id),
        pad_token=tok(info.pad_id),
        unk_token=tok(info.unk_id),
        add_bos_token=info.add_bos,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=info.context_length,
        chat_template=info.chat_template,
    )


def _fix_config(model, info: GGUFInfo, stop_ids: list[int]) -> None:
    """Make config.json state the GGUF's true values instead of whatever the loader defaulted to."""
    from transformers import GenerationConfig

    cfg = model.config
    cfg.rope_theta = info.rope_theta  # wrong theta gives wrong outputs silently (SmolLM2: 100000, not 10000)
    cfg.max_position_embeddings = info.context_length
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = info.bos_id, info.eos_id, info.pad_id
    if hasattr(cfg, "_model_name_or_path"):  # the GGUF's general.name, not a path: misleading in config.json
        del cfg._model_name_or_path
    model.generation_config = GenerationConfig(
        bos_token_id=info.bos_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=info.pad_id,
    )


def _tie_embeddings(model, info: GGUFInfo, log: Log) -> None:
    """Share one matrix between embed_tokens and lm_head, as the upstream architecture does.

    Some GGUFs (the Qwen one) store the tied matrix twice at different precisions (token_embd Q5_0,
    output Q8_0): keep the more precise copy for both, which is closer to the original weights, saves
    the second copy (136M parameters for Qwen) and gives the config upstream's tie_word_embeddings=true.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if info.output_bits is not None and info.output_bits > info.embedding_bits:
        emb.weight = head.weight
        log(f"  tying embeddings: using output.weight ({info.output_bits:g} bits/weight) for both")
    elif info.output_bits is not None:
        log(f"  tying embeddings: using token_embd.weight ({info.embedding_bits:g} bits/weight) for both")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _stop_ids(tokenizer, source: ModelSource) -> list[int]:
    ids = []
    for t in source.stop_tokens:
        enc = tokenizer.convert_tokens_to_ids(t)
        if enc is None or enc == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(enc) != t:
            raise EmbeddedModelError(f"{source.name}: stop token {t!r} is not in the GGUF vocabulary")
        ids.append(enc)
    return ids


def convert_checkpoint(source: ModelSource, gguf_path: Path, out_dir: Path, log: Log = print) -> None:
    """GGUF -> bf16 safetensors checkpoint in out_dir (config, generation config, tokenizer, weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    info = read_gguf_info(gguf_path)
    tokenizer = build_tokenizer(info)
    stop_ids = _stop_ids(tokenizer, source)
    # save_jinja_files=False: keep chat_template inside tokenizer_config.json, where older readers look.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    log(f"  tokenizer from GGUF metadata: {len(tokenizer)} tokens, stop ids {stop_ids} ({time.monotonic() - t0:.1f} s)")

    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    log(
        f"  dequantized {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({time.monotonic() - t0:.1f} s)"
    )
    if source.tie_word_embeddings:
        _tie_embeddings(model, info, log)
    _fix_config(model, info, stop_ids)
    t0 = time.monotonic()
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="20GB")
    del model
    log(f"  saved bf16 safetensors ({time.monotonic() - t0:.1f} s)")
    verify_checkpoint(out_dir, info, stop_ids, tied=source.tie_word_embeddings)
    log(f"  verified: rope_theta {info.rope_theta:g}, context {info.context_length}, eos {stop_ids}")


def verify_checkpoint(out_dir: Path, info: GGUFInfo, stop_ids: list[int], *, tied: bool) -> None:
    """Reload what was written the way a worker will, and refuse a checkpoint that reads back wrong."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    problems = []
    cfg = AutoConfig.from_pretrained(out_dir)
    if float(cfg.rope_theta) != info.rope_theta:
        problems.append(f"rope_theta reads back as {cfg.rope_theta}, GGUF says {info.rope_theta}")
    gen = GenerationConfig.from_pretrained(out_dir)
    if sorted(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]) != sorted(stop_ids):
        problems.append(f"generation_config eos_token_id {gen.eos_token_id} != {stop_ids}")
    # fix_mistral_regex=False: transformers 4.57.6 warns about a Mistral regex for every local tokenizer with
    # >100k tokens saved by 4.57.3+ (Qwen included); passing the flag only silences that false alarm.
    tok = AutoTokenizer.from_pretrained(out_dir, fix_mistral_regex=False)
    if info.chat_template and tok.chat_template != info.chat_template:
        problems.append("chat_template missing from tokenizer_config.json")
    if tok.eos_token_id != info.eos_id:
        problems.append(f"tokenizer eos {tok.eos_token!r} (id {tok.eos_token_id}) != GGUF eos id {info.eos_id}")
    model, loading = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(kind):
            problems.append(f"{kind} when reloading weights: {list(loading[kind])[:5]}")
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if shared != tied or bool(cfg.tie_word_embeddings) != tied:
        problems.append(f"lm_head shared={shared}, config tie={cfg.tie_word_embeddings}, wanted {tied}")
    if problems:
        raise EmbeddedModelError(f"converted checkpoint {out_dir} is not right: " + "; ".join(problems))
