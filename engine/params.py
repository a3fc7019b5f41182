"""FastChat's generation parameters (the dict its API server posts to /worker_generate_stream)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenParams:
    prompt: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    echo: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def greedy(self) -> bool:
        # Same rule as fastchat.serve.inference.generate_stream.
        return self.temperature < 1e-5 or self.top_p < 1e-8

    @classmethod
    def from_fastchat(cls, p: dict, eos_token_id: int | None, model_stop_ids: Iterable[int] = ()) -> GenParams:
        """`model_stop_ids`: the adapter's own end-of-turn ids, which apply even when a direct
        /worker_generate call sends none (as worker_adapters.common.with_stop_ids does)."""
        stop = p.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        stop_ids = set(p.get("stop_token_ids") or ()) | {int(i) for i in model_stop_ids}
        if eos_token_id is not None:
            stop_ids.add(int(eos_token_id))

        def num(key, default, kind=float):
            v = p.get(key)
            return default if v is None else kind(v)

        return cls(
            prompt=p["prompt"],
            temperature=num("temperature", 1.0),
            top_p=num("top_p", 1.0),
            top_k=num("top_k", -1, int),
            repetition_penalty=num("repetition_penalty", 1.0),
            max_new_tokens=max(1, num("max_new_tokens", 256, int)),
            # FastChat's worker defaults echo to True; its API server always sends it explicitly.
            echo=bool(p.get("echo", True)),
            stop=tuple(s for s in stop if s),
            stop_token_ids=frozenset(int(t) for t in stop_ids),
        )

    def to_fastchat(self) -> dict:
        """Back to the dict a FastChat generate_stream function takes (the serial path)."""
        return {"prompt": self.prompt, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens,
                "echo": self.echo, "stop": list(self.stop), "stop_token_ids": sorted(self.stop_token_ids)}


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first of equal maxima) of [rows, vocab] logits. In fp32: torch's bf16 argmax is
    not vectorised (Qwen2.5's 151936 logits: 0.56 ms a row in bf16, 0.17 ms converted first; 4 rows 1.15 ->
    0.54 ms, every decode step). Widening bf16 to fp32 is exact, so the choice is the same."""
    return logits.float().argmax(dim=-1).tolist()


def choose_token(logits: torch.Tensor, params: GenParams, output_ids: list[int],
                 generator: torch.Generator | None = None) -> int:
    """Pick the next token for one row from its last-position logits (shape [vocab]).

    Greedy is a plain argmax so the batched and the single-request paths agree exactly; sampling
    reuses FastChat's own logits processors so the knobs mean what they mean in the stock worker.
    """
    if params.greedy:
        return greedy_tokens(logits[None])[0]
    from fastchat.serve.inference import prepare_logits_processor

    procs = prepare_logits_processor(params.temperature, params.repetition_penalty, params.top_p, params.top_k)
    scores = logits.float().unsqueeze(0)
    if procs:
        prev = torch.tensor([output_ids], dtype=torch.long) if params.repetition_penalty > 1.0 else None
        scores = procs(prev, scores)
    probs = torch.softmax(scores[0], dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
