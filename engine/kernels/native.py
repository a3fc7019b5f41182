"""Build (once, with the system's C compiler) and load the C kernels: linear.c (bf16 and fp32 linears on
AVX2), linear_avx512bf16.c (bf16 linears on AVX512_BF16, called only where the CPU has it),
attention.c (attention for bf16 and fp32: decode steps and prompts), fused_ops.c (RMSNorm, rotary embedding,
SiLU-and-multiply). `build` compiles other sources the same way too (the bench's bandwidth probe, bench/raw.py).

Why a plain C file behind ctypes and not a PyTorch C++ extension: it compiles in about a second
with no PyTorch headers, needs no build step in `make setup`, and a machine without a compiler
keeps working on PyTorch's own kernels (the reason is logged). The library is cached per source
hash and compiler flags under ~/.cache/cpu-arena (CPU_ARENA_KERNEL_CACHE overrides) and written
by rename, so workers starting together never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch  # first: its OpenMP runtime is the one the kernel's libgomp.so.1 resolves to

from engine.host.hardware import cpu_flags

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("linear.c", "linear_avx512bf16.c", "attention.c", "fused_ops.c",
                                         "decode_step.c"))
HEADERS = tuple(CSRC / name for name in ("bf16_simd.h", "linear_blocks.h", "attention_body.h", "fused_ops_body.h"))
# -ffp-contract=off: the scalar tails stay multiply-then-add everywhere, so an output is computed by the
# same operations whichever block computed it (a row's result must not depend on the batch).
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
NEEDS = ("avx2", "fma")
# linear_avx512bf16.c is compiled for these (its own `#pragma GCC target`) and called only where all are present.
BF16_UNITS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def has_bf16_units() -> bool:
    return set(BF16_UNITS) <= cpu_flags()


class NativeKernel:
    """The loaded library. `__call__` computes x @ w.T (+ bias) for a 2D x and a bf16 or fp32 weight, in the
    weight's dtype; `attention` is bf16 or fp32 attention (decode steps and prompts, attention.py).

    `bf16_units`: bf16 linears on linear_avx512bf16.c (default: where the CPU has AVX512_BF16), else on
    linear.c's AVX2 widening."""

    def __init__(self, path: Path, bf16_units: bool | None = None):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self.bf16_units = has_bf16_units() if bf16_units is None else bf16_units
        self._linear = {}
        for dtype, name in ((torch.bfloat16, "linear_bf16"), (torch.float32, "linear_f32")):
            fn = self._linear[dtype] = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
        self._linear_dp = lib.linear_bf16_avx512  # no scratch: it reads the bf16 inputs as they are
        self._linear_dp.restype = None
        self._linear_dp.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        lib.linear_xtile.restype = ctypes.c_int
        self.xtile = lib.linear_xtile()  # input rows per pass over the weight: the scratch holds that many
        self._attn = {torch.bfloat16: lib.attention_bf16, torch.float32: lib.attention_f32}
        lib.attention_tile_queries.restype = ctypes.c_int
        self.tile_queries = lib.attention_tile_queries()  # queries whose scores a thread holds at once
        for fn in self._attn.values():
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        self._fused = {}
        for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            norm, rotary, silu_mul = (getattr(lib, f"{op}_{suffix}") for op in ("rms_norm", "rotary", "silu_mul"))
            norm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_int, ctypes.c_float, ctypes.c_int]
            rotary.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
            silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_int]
            for fn in (norm, rotary, silu_mul):
                fn.restype = None
            self._fused[dtype] = (norm, rotary, silu_mul)
        self._mlp_block = lib.mlp_block_bf16
        self._mlp_block.restype = None
        self._mlp_block.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
        lib.decode_step_layer_fields.restype = ctypes.c_int
        self.layer_fields = lib.decode_step_layer_fields()  # int64 columns of decoder_layers' layer table
        self._layers = lib.decoder_layers_bf16
        self._layers.restype = None
        self._layers.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7 \
            + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
        self._layers_scratch = lib.decode_step_scratch
        self._layers_scratch.restype = ctypes.c_long
        self._layers_scratch.argtypes = [ctypes.c_int] * 6

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.dtype == torch.bfloat16 and self.bf16_units and weight.dim() == 2:
            return self.linear_avx512(x, pack_avx512bf16(weight), bias)  # packs on every call: tests, one-offs
        rows, n_in = x.shape
        n_out = weight.shape[0]
        fn = self._linear.get(weight.dtype)
        if fn is None or not weight.is_contiguous() or weight.shape[1] != n_in:
            raise ValueError(f"the linear kernel needs a contiguous bf16 or fp32 [{n_out}, {n_in}] weight, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        xw, bias, y = _in_weight_dtype(x, bias, weight.dtype, n_out)
        buf = torch.empty(min(rows, self.xtile) * n_in, dtype=torch.float32)  # the inputs widened to fp32
        # ctypes releases the GIL for the call: the worker's HTTP thread keeps streaming meanwhile.
        fn(weight.data_ptr(), xw.data_ptr(), _ptr(bias), y.data_ptr(), buf.data_ptr(), rows, n_out, n_in,
           torch.get_num_threads())
        return y.to(x.dtype)

    def linear_avx512(self, x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ w.T (+ bias) in bf16 on linear_avx512bf16.c, for `operand` = pack_avx512bf16(w). 2D x."""
        rows, n_in = x.shape
        n_out = operand.shape[0]
        if not self.bf16_units:
            raise RuntimeError("linear_avx512bf16.c needs a CPU with AVX512_BF16")
        if operand.dtype != torch.bfloat16 or not operand.is_contiguous() or operand.dim() != 2 \
                or operand.shape[1] != _pairs(n_in) * 2:
            raise ValueError(f"expected pack_avx512bf16() of a [{n_out}, {n_in}] bf16 weight, got "
                             f"{operand.dtype} {tuple(operand.shape)}")
        xw, bias, y = _in_weight_dtype(x, bias, torch.bfloat16, n_out)
        self._linear_dp(operand.data_ptr(), xw.data_ptr(), _ptr(bias), y.data_ptr(), rows, n_out, n_in,
                        torch.get_num_threads())
        return y.to(x.dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, causal: bool = False) -> torch.Tensor:
        """q [B, H, Q, D], k/v [B, Hkv, T, D] (all bf16 or all fp32, last dim contiguous), mask additive fp32
        [B, H, Q, T] (strides 0 where broadcast) or None, causal: query i sees keys 0..i (SDPA's is_causal)
        -> [B, H, Q, D] in q's dtype. The caller (attention.py) checks shapes and dtypes."""
        B, H, Q, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        threads = torch.get_num_threads()
        out = torch.empty(B, H, Q, D, dtype=q.dtype)
        # attention_body.h: each thread's tile of queries, each with 8 spare lanes past its T scores
        scores = torch.empty(threads * self.tile_queries * (T + 8), dtype=torch.float32)
        q_st, k_st, v_st, m_st = (_longs(t.stride() if t is not None else (0, 0, 0, 0)) for t in (q, k, v, mask))
        self._attn[q.dtype](q.data_ptr(), q_st, k.data_ptr(), k_st, v.data_ptr(), v_st,
                            _ptr(mask), m_st,
                            out.data_ptr(), scores.data_ptr(), B, H, Hkv, Q, T, D, scale, int(causal), threads)
        return out

    # fused_ops.c. The callers (fused_ops.py) check dtypes, shapes, strides and widths (multiples of 8).
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [rows, n] (rows x.stride(0) apart, n contiguous), weight [n] -> [rows, n] contiguous."""
        rows, n = x.shape
        y = torch.empty(rows, n, dtype=x.dtype)
        self._fused[x.dtype][0](x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), rows, n, eps,
                                torch.get_num_threads())
        return y

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, S, D], cos and sin [B, S, D] with the same strides, all with D contiguous -> [B, H, S, D]."""
        B, H, S, D = x.shape
        out = torch.empty(B, H, S, D, dtype=x.dtype)
        self._fused[x.dtype][1](x.data_ptr(), _longs(x.stride()), cos.data_ptr(), sin.data_ptr(),
                                _longs(cos.stride()), out.data_ptr(), B, H, S, D, torch.get_num_threads())
        return out

    def silu_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g, u [rows, n] (rows at their own stride(0), n contiguous) -> silu(g) * u, [rows, n] contiguous."""
        rows, n = g.shape
        out = torch.empty(rows, n, dtype=g.dtype)
        self._fused[g.dtype][2](g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), out.data_ptr(), rows, n,
                                torch.get_num_threads())
        return out

    def mlp_block(self, residual: torch.Tensor, attn: torch.Tensor, o_proj: tuple, norm_weight: torch.Tensor,
                  eps: float, gate_up: tuple, down: tuple) -> torch.Tensor:
        """residual + o_proj(attn), then + down(silu(gate(n)) * up(n)) of its RMSNorm n, in bf16 on
        linear_avx512bf16.c (fused_ops.c's mlp_block_bf16). residual [rows, hidden], attn [rows, attn_dim],
        contiguous bf16; each projection a (pack_avx512bf16 weight, bias or None) pair, gate_up gate's rows then
        up's. The caller (fused_ops.FusedDecoderLayer) checks."""
        if not self.bf16_units:
            raise RuntimeError("mlp_block runs on linear_avx512bf16.c, which needs a CPU with AVX512_BF16")
        rows, hidden = residual.shape
        inter = gate_up[0].shape[0] // 2
        out = torch.empty(rows, hidden, dtype=torch.bfloat16)
        scratch = torch.empty(rows * (hidden + 3 * inter), dtype=torch.bfloat16)
        self._mlp_block(residual.data_ptr(), attn.data_ptr(), o_proj[0].data_ptr(), _ptr(o_proj[1]),
                        norm_weight.data_ptr(), eps, gate_up[0].data_ptr(), _ptr(gate_up[1]), down[0].data_ptr(),
                        _ptr(down[1]), out.data_ptr(), scratch.data_ptr(), rows, attn.shape[1], hidden, inter,
                        torch.get_num_threads())
        return out


    def decoder_layers(self, table: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor | None, pos: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                       eps: float, scale: float) -> None:
        """Every decoder layer of a bf16 decode step (decode_step.c's decoder_layers_bf16), in place on x [rows,
        hidden]: `table` [layers, layer_fields] int64 (weights and cache buffers, decode_step.py fills it), cos and
        sin [rows, head_dim] contiguous, mask additive fp32 [rows, pos + 1] contiguous or None, the new column at
        `pos`. The caller (decode_step.py) checks."""
        if not self.bf16_units:
            raise RuntimeError("decoder_layers runs on linear_avx512bf16.c, which needs a CPU with AVX512_BF16")
        rows, hidden = x.shape
        threads = torch.get_num_threads()
        scratch = torch.empty(self._layers_scratch(rows, hidden, heads, kv_heads, head_dim, inter), dtype=torch.bfloat16)
        scores = torch.empty(threads * self.tile_queries * (pos + 1 + 8), dtype=torch.float32)  # attention's
        self._layers(table.data_ptr(), table.shape[0], x.data_ptr(), cos.data_ptr(), sin.data_ptr(), _ptr(mask), pos,
                     rows, hidden, heads, kv_heads, head_dim, inter, eps, scale, scratch.data_ptr(), scores.data_ptr(),
                     threads)


def _in_weight_dtype(x: torch.Tensor, bias: torch.Tensor | None, wdtype: torch.dtype, n_out: int):
    """(x and bias in the weight's dtype and contiguous, as the kernels read them; the output to fill)."""
    if bias is not None:
        bias = bias.to(wdtype).contiguous()
    return x.to(wdtype).contiguous(), bias, torch.empty(x.shape[0], n_out, dtype=wdtype)


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


PACK_ROWS = 64  # linear_avx512bf16.c's TILE


def _pairs(n_in: int) -> int:
    return (n_in + 1) // 2


def pack_avx512bf16(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [n_out, n_in] weight in linear_avx512bf16.c's layout, [n_out, n_in rounded up to even]: rows in
    tiles of 64 (the last one holds the n_out % 64 left), within a tile column pair by column pair, the pair's
    64 rows side by side ([pairs][rows][2]), so a tile is one sequential read; a zero column past an odd n_in.
    A new tensor."""
    n_out, n_in = weight.shape
    pairs = _pairs(n_in)
    # One copy of the weight at a time beside it (a 7B model's 1.2 GB output projection is packed at load).
    padded = torch.nn.functional.pad(weight, (0, 1)) if n_in % 2 else weight
    whole = n_out // PACK_ROWS * PACK_ROWS
    out = torch.empty(n_out, 2 * pairs, dtype=torch.bfloat16)
    out[:whole].view(-1, pairs, PACK_ROWS, 2).copy_(padded[:whole].reshape(-1, PACK_ROWS, pairs, 2).transpose(1, 2))
    out[whole:].view(pairs, n_out - whole, 2).copy_(padded[whole:].reshape(n_out - whole, pairs, 2).transpose(0, 1))
    return out


def unpack_avx512bf16(packed: torch.Tensor, n_in: int) -> torch.Tensor:
    """The plain bf16 [n_out, n_in] weight that pack_avx512bf16 packed into `packed`: a new tensor, for PyTorch's
    matmul on a prompt pass (engine/kernels/paths.py) while the model keeps only the packed copy."""
    n_out, width = packed.shape
    pairs = width // 2
    whole = n_out // PACK_ROWS * PACK_ROWS
    out = torch.empty(n_out, width, dtype=torch.bfloat16)
    out[:whole].view(-1, PACK_ROWS, pairs, 2).copy_(packed[:whole].view(-1, pairs, PACK_ROWS, 2).transpose(1, 2))
    out[whole:].view(n_out - whole, pairs, 2).copy_(packed[whole:].view(pairs, n_out - whole, 2).transpose(0, 1))
    return out[:, :n_in] if n_in != width else out


def _longs(values) -> ctypes.Array:
    return (ctypes.c_long * len(values))(*values)


def cache_dir() -> Path:
    root = os.environ.get("CPU_ARENA_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpu-arena" / "kernels"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def build(out_dir: Path | None = None, sources: tuple[Path, ...] | None = None, headers: tuple[Path, ...] | None = None,
          name: str = "kernels") -> Path:
    """Compile `sources` (default: the kernels, SOURCES with HEADERS) into one library named after `name`, unless
    these sources, headers and flags were compiled before; returns the library."""
    sources = SOURCES if sources is None else sources
    headers = HEADERS if headers is None else headers
    cc = compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)")
    text = b"".join(p.read_bytes() for p in (*sources, *headers)) + " ".join(FLAGS).encode()
    digest = hashlib.sha256(text).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"{name}-{digest}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {', '.join(p.name for p in sources)}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@cache
def native_kernel() -> tuple[NativeKernel | None, str]:
    """(the kernel, "") or (None, why it is not used here). Built and loaded once per process."""
    missing = [f for f in NEEDS if f not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    try:
        return NativeKernel(build()), ""
    except (OSError, RuntimeError) as e:
        return None, f"kernels not built: {e}"
