"""A minimal Prometheus registry and text exposition (format 0.0.4), no dependency.

prometheus_client is not in the pinned set; the API server needs only counters, gauges and
histograms with labels, rendered on GET /metrics. Thread-safe: FastChat runs sync code in threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

LabelKey = tuple[tuple[str, str], ...]


def _key(labels: dict[str, object]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}" if items else ""


def _fmt_num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str):
        super().__init__(name, help_)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        k = _key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(_key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_num(v)}" for k, v in items]


class Gauge(_Metric):
    """Set directly, or computed at scrape time by a callback returning {labels: value}."""

    kind = "gauge"

    def __init__(self, name: str, help_: str, collect: Callable[[], Iterable[tuple[dict, float]]] | None = None):
        super().__init__(name, help_)
        self._values: dict[LabelKey, float] = {}
        self._collect = collect

    def set(self, value: float, **labels: object) -> None:
        with self._lock:
            self._values[_key(labels)] = value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self._values)
        if self._collect is not None:
            for labels, v in self._collect():
                values[_key(labels)] = v
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_num(v)}" for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help_)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[LabelKey, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: object) -> None:
        k = _key(labels)
        with self._lock:
            s = self._series.setdefault(k, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1  # cumulative: every bucket whose bound holds the value
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: object) -> float:
        s = self._series.get(_key(labels))
        return s[-1] if s else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        out = self.header()
        for k, s in items:
            for b, c in zip(self.buckets, s, strict=False):
                out.append(f"{self.name}_bucket{_fmt_labels(k, (('le', _fmt_num(b)),))} {_fmt_num(c)}")
            out.append(f"{self.name}_sum{_fmt_labels(k)} {_fmt_num(s[-2])}")
            out.append(f"{self.name}_count{_fmt_labels(k)} {_fmt_num(s[-1])}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        # Idempotent by name: patches may be applied more than once in a process.
        return self._metrics.setdefault(metric.name, metric)

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.render()
        return "\n".join(lines) + "\n"


REGISTRY = Registry()

# The API server's metrics (launch/fastchat_patches/api_metrics.py exposes them).
REQUESTS = REGISTRY.add(Counter("cpu_arena_api_requests_total", "API requests by path, model and HTTP status"))
ERRORS = REGISTRY.add(Counter("cpu_arena_api_errors_total",
                              "API errors by code (HTTP status, or stream_error for a stream ended by an error event)"))
TOKENS = REGISTRY.add(Counter("cpu_arena_generated_tokens_total", "completion tokens generated, by model"))
PROMPT_TOKENS = REGISTRY.add(Counter("cpu_arena_prompt_tokens_total", "prompt tokens processed, by model"))
LATENCY = REGISTRY.add(Histogram("cpu_arena_request_latency_seconds", "whole request, to the last byte, by model"))
TTFT = REGISTRY.add(Histogram("cpu_arena_time_to_first_token_seconds", "request start to first streamed text, by model"))
REJECTED = REGISTRY.add(Counter("cpu_arena_queue_rejections_total", "requests refused with 429 (queue full), by model"))
