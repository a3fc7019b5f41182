"""What the project's worker shares with the launcher and FastChat's processes, without importing them.

- The error chunk a worker answers for a generation that raised (FastChat's worker protocol): the batching
  worker (engine/worker.py) sends it, and the patch to FastChat's stock worker
  (launch/fastchat_patches/worker_errors.py) answers with the same text, which the API server's guard turns
  into a 500 server_error carrying it.
- The defaults of the worker's per-model options. launch/config.py takes its model defaults from here and
  puts every setting on the worker's command line, so the worker's argparse defaults and the config's are
  one set of numbers.
"""

from __future__ import annotations

INTERNAL_ERROR = 50001  # fastchat.constants.ErrorCode.INTERNAL_ERROR

# Requests running or waiting beyond this answer 429 (`--limit-worker-concurrency`, the config's max_queue).
MAX_QUEUE = 16
# Rows decoded together (`--max-batch`).
MAX_BATCH = 8
# Linear layers on the AVX2 kernel or oneDNN prepacked weights (`--prepack`, engine/kernels/linear.py).
PREPACK_WEIGHTS = True
# Which implementation each kind of call runs on (`--paths`, engine/kernels/paths.py): "measure" times the
# candidates on the model's shapes at worker start (cached per machine), "kernels" keeps everything on the
# project's kernels, or a fixed choice such as "decode=kernel,prompt_torch_from=256,attention_torch_from=1024".
PATHS = "measure"
# MB of finished requests' keys and values kept for prompts that begin like them (`--prefix-cache-mb`).
PREFIX_CACHE_MB = 256
# A request's text goes out at its first token, then every STREAM_INTERVAL tokens (and at its end): FastChat's
# own worker's default (`--stream-interval 2`). Why not every token: each chunk is relayed by the worker's
# event loop (which takes the GIL between the step's kernels), the API server and the client, all on the cores
# the step runs on. Through the API, 4 SmolLM2 clients' decode steps took 20.6 ms against 22.1 ms sending
# every token (medians of 8 alternating rounds).
STREAM_INTERVAL = 2


def exception_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def worker_error_text(error: str) -> str:
    """What a worker answers for a generation that raised `error` ("ValueError: boom")."""
    return f"the model worker failed while generating: {error} (the traceback is in the worker's log)"


def error_chunk(error: str) -> dict:
    return {"text": worker_error_text(error), "error_code": INTERNAL_ERROR}
