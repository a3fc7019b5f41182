"""ChatGLM3-6B and Qwen-7B-Chat on transformers' own classes, loaded from the published checkpoint folder.

Both lab models ship modelling code written for transformers 4.30-4.32 that every later release breaks
somewhere, and that the batching engine cannot drive (no `logits_to_keep`, tuple caches in their own
layouts). Their architectures are standard blocks that transformers 4.57 implements natively:
- Qwen-7B-Chat (`QWenLMHeadModel`) is a Qwen2 decoder: the fused `c_attn` (q, k, v, with bias) splits into
  q/k/v_proj; `c_proj` is o_proj; `ln_1`/`ln_2`/`ln_f` are RMSNorms; the MLP is `c_proj(w1(x) * silu(w2(x)))`,
  so gate = w2 and up = w1, of width intermediate_size // 2; rotary on the whole head, base rotary_emb_base.
  Its logn attention and dynamic NTK change nothing up to `seq_length` tokens, so that is the context served.
- ChatGLM3-6B (`ChatGLMForConditionalGeneration`) is `GlmForCausalLM`: the fused `query_key_value` (with bias)
  splits into 32 query heads and `multi_query_group_num` key/value heads of `kv_channels`; rotary on half of
  each head in interleaved pairs, base 10000 (`original_rope`, no rope_ratio); the fused `dense_h_to_4h` is
  GLM's gate_up_proj as is (gate first, as ChatGLM's swiglu chunks it); eps is `layernorm_epsilon`.
Tensors are read one at a time (safetensors or `.bin` shards, whichever the download has), converted to the
served dtype and placed into a model whose parameters start empty, so no second full copy is ever held.
Safetensors shards are read with plain reads, not mapped: a mapped shard's pages count in the process's RSS until
it is closed, the whole shard on top of the weights at the peak (see safetensors_tensors).
tests/test_native_models.py holds this mapping to the published code: logits within 1e-4 in fp32.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class NativeLayout:
    """How one published architecture maps onto a transformers class."""

    model_class: type
    config: object  # the transformers config of model_class
    rename: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]  # published tensor -> native tensors


def _remote_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _renamer(*, top: dict[str, str], layer_prefix: str, fused_qkv: str, qkv_sizes: tuple[int, int, int],
             per_layer: dict[str, str]) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """A published tensor name -> the native tensors it becomes, for a decoder whose layers are numbered under
    `layer_prefix` and whose attention fuses q, k, v (weight and bias) in one tensor of `qkv_sizes` rows.
    Names in neither table (the remote code's rotary inv_freq buffers) map to nothing: recomputed natively."""
    layer_re = re.compile(re.escape(layer_prefix) + r"(\d+)\.(.+)")

    def rename(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name in top:
            return [(top[name], t)]
        m = layer_re.fullmatch(name)
        if m is None:
            return []
        layer, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest.startswith(fused_qkv):
            kind = rest.rsplit(".", 1)[1]
            parts = t.split(qkv_sizes, dim=0)
            return [(f"{layer}self_attn.{p}_proj.{kind}", x) for p, x in zip("qkv", parts, strict=True)]
        return [(layer + per_layer[rest], t)] if rest in per_layer else []

    return rename


def qwen_layout(folder: Path) -> NativeLayout:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = _remote_config(folder)
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("kv_channels") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"{folder}: kv_channels {head_dim} x {heads} heads != hidden_size {hidden}")
    if float(c.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(f"{folder}: rotary_pct {c['rotary_pct']} (Qwen2 rotates the whole head)")
    config = Qwen2Config(
        vocab_size=c["vocab_size"], hidden_size=hidden, intermediate_size=c["intermediate_size"] // 2,
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=c.get("seq_length", 8192), rms_norm_eps=c.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(c.get("rotary_emb_base", 10000)), tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=None, eos_token_id=151643, pad_token_id=151643,
    )

    rename = _renamer(
        top={"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"},
        layer_prefix="transformer.h.", fused_qkv="attn.c_attn.", qkv_sizes=(hidden, hidden, hidden),
        per_layer={"attn.c_proj.weight": "self_attn.o_proj.weight", "ln_1.weight": "input_layernorm.weight",
                   "ln_2.weight": "post_attention_layernorm.weight", "mlp.w1.weight": "mlp.up_proj.weight",
                   "mlp.w2.weight": "mlp.gate_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"})
    return NativeLayout(Qwen2ForCausalLM, config, rename)


def glm_layout(folder: Path) -> NativeLayout:
    from transformers import GlmConfig, GlmForCausalLM

    c = _remote_config(folder)
    if c.get("rope_ratio", 1) != 1 or not c.get("original_rope", True):
        raise ValueError(f"{folder}: rope_ratio/original_rope other than ChatGLM3-6B's (base 10000) are not mapped")
    if not c.get("multi_query_attention", False) or not c.get("rmsnorm", True) or c.get("add_bias_linear"):
        raise ValueError(f"{folder}: not ChatGLM3-6B's block (grouped queries, RMSNorm, no linear bias)")
    heads, groups, head_dim = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
    config = GlmConfig(
        vocab_size=c["padded_vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["ffn_hidden_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=heads, num_key_value_heads=groups,
        head_dim=head_dim, partial_rotary_factor=0.5, max_position_embeddings=c.get("seq_length", 8192),
        rms_norm_eps=c.get("layernorm_epsilon", 1e-5), rope_theta=10000.0, attention_bias=c.get("add_qkv_bias", True),
        tie_word_embeddings=False, pad_token_id=c.get("pad_token_id", 0),
        eos_token_id=[c.get("eos_token_id", 2), 64795, 64797], bos_token_id=None,
    )
    sizes = (heads * head_dim, groups * head_dim, groups * head_dim)

    rename = _renamer(
        top={"transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "transformer.encoder.final_layernorm.weight": "model.norm.weight",
             "transformer.output_layer.weight": "lm_head.weight"},
        layer_prefix="transformer.encoder.layers.", fused_qkv="self_attention.query_key_value.", qkv_sizes=sizes,
        per_layer={"self_attention.dense.weight": "self_attn.o_proj.weight",
                   "input_layernorm.weight": "input_layernorm.weight",
                   "post_attention_layernorm.weight": "post_attention_layernorm.weight",
                   "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                   "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"})
    return NativeLayout(GlmForCausalLM, config, rename)


LAYOUTS: dict[str, Callable[[Path], NativeLayout]] = {"qwen": qwen_layout, "chatglm": glm_layout}


def checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder, one at a time: safetensors shards if present, else `.bin` shards
    (memory-mapped, so a shard is never read whole into memory)."""
    for name, tensor, _ in _checkpoint_tensors(folder):
        yield name, tensor


def _checkpoint_tensors(folder: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """checkpoint_tensors with, for each tensor, whether it owns its memory (else it lives in a mapped file);
    safetensors' floating tensors already in `dtype` where given (safetensors_tensors)."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        for f in st:
            for name, tensor in safetensors_tensors(f, dtype):
                yield name, tensor, True
        return
    bins = sorted(f for f in folder.glob("*.bin") if f.name.startswith("pytorch_model"))
    if not bins:
        raise FileNotFoundError(f"{folder}: no *.safetensors and no pytorch_model*.bin weights")
    for f in bins:
        shard = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        for name in list(shard):
            yield name, shard.pop(name), False
        del shard


# The safetensors format's dtype names (its header), little-endian as the format stores them.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_tensors(path: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one safetensors file in file order, each read into memory of its own; floating tensors
    converted to `dtype` where given.

    Why not safetensors' safe_open: it maps the file, and every page a copy out of it touches stays in this
    process's RSS (as RssFile) until the file is closed, the current ~2 GB shard on top of the weights. Peak RSS
    of load_native in bf16 against the weights, `make bench ARGS='--shape ...'` checkpoints (bench/shapes.py):
    Qwen-7B-shaped (bf16 stored) 1.141 mapped, 1.92 GB of it the shard's pages; 1.023 read. A same-dtype tensor is
    read once, straight into the memory it is served from (safe_open's needed a copy out of the mapping). Another
    dtype is converted as it is read, through a small reused buffer: ChatGLM3-6B-shaped (fp16 stored) 1.113
    mapped, 1.071 read whole then converted (the 0.53 GB fp16 embedding held twice), 1.034 converted in chunks.
    """
    stage = None
    with open(path, "rb", buffering=0) as f:
        (size,) = struct.unpack("<Q", _read_exactly(f, 8))
        header = json.loads(_read_exactly(f, size))
        header.pop("__metadata__", None)
        base = 8 + size
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            stored = SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which the loader does not read")
            start, end = info["data_offsets"]
            target = dtype if dtype is not None and stored.is_floating_point else stored
            tensor = torch.empty(info["shape"], dtype=target)
            if tensor.numel() * stored.itemsize != end - start:
                raise ValueError(f"{path}: {name} holds {end - start} bytes for shape {info['shape']} {info['dtype']}")
            f.seek(base + start)
            if target == stored:
                _read_into(f, _bytes_of(tensor), path)
            else:
                if stage is None or stage.dtype != stored:
                    stage = torch.empty(STAGE_BYTES // stored.itemsize, dtype=stored)
                flat = tensor.view(-1)
                for i in range(0, flat.numel(), stage.numel()):
                    part = stage[:min(stage.numel(), flat.numel() - i)]
                    _read_into(f, _bytes_of(part), path)
                    flat[i:i + part.numel()].copy_(part)
            yield name, tensor


STAGE_BYTES = 16 << 20  # what a conversion adds to the peak; large enough that the per-chunk calls cost nothing


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as a writable byte buffer."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{f.name}: ends inside its header (not a safetensors file?)")
    return data


def _read_into(f, view: memoryview, path: Path) -> None:
    # One read returns at most ~2 GB on Linux, and fewer bytes than asked whenever it likes: loop.
    while view.nbytes:  # an empty tensor reads nothing
        n = f.readinto(view)
        if not n:
            raise ValueError(f"{path}: ends before its tensors do (truncated?)")
        view = view[n:]


def load_native(folder: str | Path, dtype: torch.dtype):
    """The published checkpoint in `folder` as transformers' native model, in `dtype`, in eval mode."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    model_type = _remote_config(folder).get("model_type")
    if model_type not in LAYOUTS:
        raise ValueError(f"{folder}: no native layout for model_type {model_type!r}")
    layout = LAYOUTS[model_type](folder)
    layout.config.torch_dtype = dtype
    # Parameters on the meta device (no memory), buffers such as the rotary frequencies real.
    with init_empty_weights(include_buffers=False):
        model = layout.model_class(layout.config)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor, owned in _checkpoint_tensors(folder, dtype):
        for native, t in layout.rename(name, tensor):
            param = expected.get(native)
            if param is None:
                raise ValueError(f"{folder}: {name} maps to {native}, which {layout.model_class.__name__} lacks")
            if tuple(param.shape) != tuple(t.shape):
                raise ValueError(f"{folder}: {name} -> {native}: shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            value = t.to(dtype).contiguous()
            # Same dtype: `value` is `t`. A parameter gets memory of its own: a .bin shard's tensors live in the mapped
            # file, and a part of a fused tensor (q of query_key_value) would keep all of it alive.
            if value.data_ptr() == t.data_ptr() and not (owned and value.nbytes == value.untyped_storage().nbytes()):
                value = value.clone()
            _set_param(model, native, value)
            loaded.add(native)
        del tensor
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no tensor for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.eval()
    model.generation_config.eos_token_id = layout.config.eos_token_id
    return model


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
