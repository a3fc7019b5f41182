"""Pure parts of the bench: repeat statistics, roofline arithmetic, the JSON report's shape."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Stat:
    """Median of repeated measurements with the noise shown as min..max."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def scaled(self, factor: float) -> Stat:
        """The same figures in other units (bytes/s -> GB/s)."""
        return Stat(self.median * factor, self.min * factor, self.max * factor, self.n)

    def fmt(self, digits: int = 1) -> str:
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f})"


def ratio(num: Stat | None, den: Stat | None) -> float | None:
    if num is None or den is None or den.median <= 0:
        return None
    return num.median / den.median


def weight_bytes_per_token(param_bytes: int, input_embedding_bytes: int, tied: bool) -> int:
    """Bytes of weights one decode step reads.

    Every matrix is read once per token, except the input embedding: a lookup reads one row.
    With tied embeddings the same matrix is the LM head and is read in full anyway.
    """
    return param_bytes if tied else param_bytes - input_embedding_bytes


def roofline_tokens_per_s(bandwidth_bytes_per_s: float, bytes_per_token: int) -> float:
    return bandwidth_bytes_per_s / bytes_per_token if bytes_per_token > 0 else 0.0


def paired_scaling(rounds: dict[int, list[float]]) -> dict[int, Stat | None]:
    """Aggregate tokens/s at N clients over the 1-client figure of the same round, then median and
    min-max over the rounds. Why paired: the rates of one round were measured next to each other
    (bench_api.client_order), so their ratio does not carry the machine's drift between rounds."""
    base = rounds.get(1, [])
    return {n: Stat.of([r / b for r, b in zip(rates, base, strict=False) if b > 0])
            for n, rates in sorted(rounds.items())}


@dataclass
class ModelReport:
    name: str
    worker: str
    dtype: str
    threads: int
    weights_bytes: int
    bytes_per_token: int
    raw_decode_tps: Stat | None = None
    raw_ttft_s: Stat | None = None
    api_decode_tps: Stat | None = None
    api_ttft_s: Stat | None = None
    roofline_tps: float | None = None  # from `bandwidth`
    bandwidth: Stat | None = None  # bytes/s read by the probe right around this model's batch-1 figures
    # Aggregate tokens/s per client count, one value per round (bench_api.aggregate_rounds).
    concurrency_rounds: dict[int, list[float]] = field(default_factory=dict)
    rss_bytes: int | None = None
    shared_decode_tps: Stat | None = None  # while every other worker also decodes
    # A chat's second turn (bench_raw.next_turn_prefill): its prompt tokens, those kept from the first turn,
    # and its prefill computed whole and from them.
    next_turn_tokens: int | None = None
    next_turn_kept: int | None = None
    next_turn_whole_s: Stat | None = None
    next_turn_kept_s: Stat | None = None

    @property
    def concurrency_tps(self) -> dict[int, Stat | None]:
        return {n: Stat.of(rates) for n, rates in sorted(self.concurrency_rounds.items())}

    @property
    def concurrency_scaling(self) -> dict[int, Stat | None]:
        return paired_scaling(self.concurrency_rounds)

    @property
    def api_vs_raw(self) -> float | None:
        return ratio(self.api_decode_tps, self.raw_decode_tps)

    @property
    def roofline_fraction(self) -> float | None:
        if not self.roofline_tps or self.raw_decode_tps is None:
            return None
        return self.raw_decode_tps.median / self.roofline_tps

    @property
    def served_roofline_fraction(self) -> float | None:
        """The same through the API: the serving worker's own kernels, not plain transformers'."""
        if not self.roofline_tps or self.api_decode_tps is None:
            return None
        return self.api_decode_tps.median / self.roofline_tps

    @property
    def shared_fraction(self) -> float | None:
        return ratio(self.shared_decode_tps, self.api_decode_tps)


def _stat(s: Stat | None):
    return asdict(s) if s is not None else None


def report_json(models: list[ModelReport], machine: dict, up_time_s: float | None, settings: dict,
                long_prompts: dict | None = None) -> dict:
    out = {
        "machine": machine,
        "settings": settings,
        "make_up_time_s": up_time_s,
        "api_vs_raw_decode_ratio": {m.name: m.api_vs_raw for m in models},
        "concurrency_scaling": {m.name: {str(n): s.median if s else None for n, s in m.concurrency_scaling.items()}
                                for m in models},
        "roofline_fraction": {m.name: m.roofline_fraction for m in models},
        "served_roofline_fraction": {m.name: m.served_roofline_fraction for m in models},
        "shared_cores_fraction_of_solo": {m.name: m.shared_fraction for m in models},
        "models": {},
    }
    for m in models:
        out["models"][m.name] = {
            "worker": m.worker, "dtype": m.dtype, "threads": m.threads,
            "weights_bytes": m.weights_bytes, "bytes_read_per_token": m.bytes_per_token,
            "rss_bytes": m.rss_bytes,
            "rss_over_weights": (m.rss_bytes / m.weights_bytes) if m.rss_bytes and m.weights_bytes else None,
            "raw_decode_tokens_per_s": _stat(m.raw_decode_tps), "raw_ttft_s": _stat(m.raw_ttft_s),
            "api_decode_tokens_per_s": _stat(m.api_decode_tps), "api_ttft_s": _stat(m.api_ttft_s),
            "roofline_tokens_per_s": m.roofline_tps,
            "bandwidth_gbs": _stat(m.bandwidth and m.bandwidth.scaled(1e-9)),
            "aggregate_tokens_per_s": {str(n): _stat(s) for n, s in m.concurrency_tps.items()},
            "aggregate_tokens_per_s_per_round": {str(n): rates for n, rates in sorted(m.concurrency_rounds.items())},
            "concurrency_scaling": {str(n): _stat(s) for n, s in m.concurrency_scaling.items()},
            "shared_decode_tokens_per_s": _stat(m.shared_decode_tps),
            "next_turn_prefill_s": {"prompt_tokens": m.next_turn_tokens, "kept_tokens": m.next_turn_kept,
                                    "whole": _stat(m.next_turn_whole_s), "from_kept_turn": _stat(m.next_turn_kept_s)},
        }
    out.update(long_prompt_fields(long_prompts))
    return out


def long_prompt_fields(prompts: dict | None) -> dict:
    """The long prompts' top-level JSON keys (bench/prompts.py): per model and prompt length as asked ("1000"),
    served TTFT / plain PyTorch prompt pass and served TTFT / the stock twin's (median, min, max over the repeats;
    None without a twin) and each path's fraction of the matmul peak (medians); the whole measurement under
    "long_prompts"."""
    if not prompts:
        return {}
    ratio, stock, fraction = {}, {}, {}
    for name, m in prompts["models"].items():
        lengths = m.get("lengths", {})
        ratio[name] = {k: v["served_vs_torch"] for k, v in lengths.items()}
        stock[name] = {k: v.get("served_vs_stock") for k, v in lengths.items()}
        fraction[name] = {k: {p: (v[f"{p}_fraction_of_matmul_peak"] or {}).get("median")
                              for p in ("served", "engine", "torch")} for k, v in lengths.items()}
    return {"prefill_vs_torch_ratio": ratio, "served_vs_stock_ratio": stock, "prompt_fraction_of_matmul_peak": fraction,
            "long_prompts": prompts}


def _s(d: dict | None, digits: int = 2) -> str:
    """A Stat's JSON form as Stat.fmt writes it."""
    return "-" if not d else Stat(d["median"], d["min"], d["max"], d["n"]).fmt(digits)


def long_prompt_lines(prompts: dict | None) -> list[str]:
    """The table's block of long-prompt figures: the CPU, the prompt pass's path, the matmul peak, per model and
    length the three prompt passes, served / plain PyTorch, the stock twin's served TTFT and served / stock, and
    the fraction of the peak."""
    if not prompts:
        return []
    units = ", ".join(prompts.get("cpu_units", [])) or "no vector units listed"
    lines = ["", f"long prompts on {prompts['cpu_model']} ({units})"]
    for dtype, path in prompts["paths"].items():
        lines.append(f"  {dtype} prompt pass: linears on {path['linear']}; attention on {path['attention']}")
    for dtype, peak in prompts["matmul_peak_gflops"].items():
        if "error" in peak:
            lines.append(f"  matmul peak {dtype}: failed ({peak['error'][:200]})")
            continue
        lines.append(f"  matmul peak {dtype} {'x'.join(map(str, peak['shape']))}, {peak['threads']} thread(s): "
                     f"torch.matmul {_s(peak['torch'], 0)} GFLOP/s, "
                     f"{peak['kernel_name'] or 'no project kernel'} {_s(peak['kernel'], 0)} GFLOP/s")
    for name, m in prompts["models"].items():
        if m.get("error"):
            lines.append(f"  {name}: failed ({m['error'][:200]})")
        if m.get("paths"):
            p = m["paths"]
            lines.append(f"  {name} paths here: decode on {p['decode']}; prompt pass on {p['prompt']}; "
                         f"attention on {p['attention']}")
        if (m.get("stock_twin") or {}).get("error"):
            lines.append(f"  {name}: stock twin failed ({m['stock_twin']['error'][:200]})")
        for k, v in m.get("lengths", {}).items():
            frac = {p: (v[f"{p}_fraction_of_matmul_peak"] or {}).get("median") for p in ("served", "engine", "torch")}
            lines.append(f"  {name} {round(sum(v['tokens']) / len(v['tokens']))} tokens (asked {k}): served TTFT "
                         f"{_s(v['served_s'])} s; prompt pass on the engine {_s(v['engine_s'])} s, plain PyTorch "
                         f"{_s(v['torch_s'])} s; served/PyTorch x{_s(v['served_vs_torch'])}")
            lines.append(f"  {' ' * len(name)} served {_s(v['served_tokens_per_s'], 0)} tok/s; of the matmul peak: served "
                         f"{_f(frac['served'])}, engine {_f(frac['engine'])}, PyTorch {_f(frac['torch'])}; API and worker "
                         f"add {_f(v['api_overhead_s'], '{:.3f}')} s")
            if v.get("stock_s"):
                lines.append(f"  {' ' * len(name)} stock FastChat worker {m['stock_twin']['name']} served TTFT "
                             f"{_s(v['stock_s'])} s; served/stock x{_s(v['served_vs_stock'])}")
    return lines


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(models: list[ModelReport], machine: dict, up_time_s: float | None, long_prompts: dict | None = None) -> str:
    lines = [
        f"memory bandwidth at the start: {machine.get('bandwidth_gbs', 0):.1f} GB/s at {machine.get('bandwidth_threads')} thread(s) "
        f"({machine.get('bandwidth_all_gbs', 0):.1f} GB/s at {machine.get('cores')})   make up: {_f(up_time_s, '{:.0f} s')}",
    ]
    for m in models:
        sc = m.concurrency_scaling
        lines += [
            "",
            f"{m.name}  [{m.worker} worker, {m.dtype}, {m.threads} thread(s), weights {m.weights_bytes / 1e6:.0f} MB, "
            f"RSS {_f(m.rss_bytes and m.rss_bytes / 1e6, '{:.0f} MB')}]",
            f"  raw generate   decode {m.raw_decode_tps.fmt() if m.raw_decode_tps else '-'} tok/s   "
            f"TTFT {m.raw_ttft_s.fmt(3) if m.raw_ttft_s else '-'} s",
            f"  API streaming  decode {m.api_decode_tps.fmt() if m.api_decode_tps else '-'} tok/s   "
            f"TTFT {m.api_ttft_s.fmt(3) if m.api_ttft_s else '-'} s   API/raw {_f(m.api_vs_raw)}",
            f"  roofline       {_f(m.roofline_tps, '{:.1f}')} tok/s ({m.bytes_per_token / 1e6:.0f} MB/token"
            + (f" at {m.bandwidth.scaled(1e-9).fmt(1)} GB/s, read around these runs" if m.bandwidth else "") + ")   "
            f"batch-1 fraction: raw {_f(m.roofline_fraction)}, served {_f(m.served_roofline_fraction)}",
        ]
        if m.concurrency_tps:
            lines.append("  clients        " + "  ".join(
                f"{n}: {s.fmt() if s else '-'} tok/s" for n, s in m.concurrency_tps.items()))
            lines.append("  x 1 client     " + "  ".join(
                f"{n}: x{sc[n].fmt(2) if sc.get(n) else '-'}" for n in sorted(sc) if n != 1)
                + "   (per round, measured side by side)")
        if m.next_turn_whole_s is not None:
            lines.append(f"  next turn      prefill {m.next_turn_whole_s.fmt(3)} s whole, "
                         f"{m.next_turn_kept_s.fmt(3) if m.next_turn_kept_s else '-'} s from the kept first turn "
                         f"({m.next_turn_tokens} tokens, {m.next_turn_kept} kept; prefix cache)")
        if m.shared_decode_tps is not None:
            lines.append(f"  all workers decoding at once: {m.shared_decode_tps.fmt()} tok/s = "
                         f"{_f(m.shared_fraction)} of solo (target >= 0.40)")
    return "\n".join(lines + long_prompt_lines(long_prompts))
