"""The UI's conversation and vote logs: one durable append per record.

FastChat's Gradio modules log each chat turn and vote with `open(get_conv_log_filename(), "a")`
then `fout.write(json.dumps(data) + "\\n")`: a buffered text file whose data reaches the disk in
as many write() calls as the buffer needs and is never fsync'ed, so a kill or crash mid-record
leaves a torn line that breaks every reader of the file. This patch gives those modules a
module-level `open` whose append mode collects the text and writes it on close through
launch/jsonl_log.py (flock, cut a torn tail, one O_APPEND write, fsync); every other mode is the builtin open.
"""

from __future__ import annotations

import builtins
from types import ModuleType

from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/gradio_web_server.py#L200-L209"
MODULES = (
    "fastchat.serve.gradio_web_server",
    "fastchat.serve.gradio_block_arena_anony",
    "fastchat.serve.gradio_block_arena_named",
    "fastchat.serve.gradio_block_arena_vision",
    "fastchat.serve.gradio_block_arena_vision_anony",
    "fastchat.serve.gradio_block_arena_vision_named",
)


class DurableAppend:
    """File-like for `with open(path, "a") as f: f.write(...)`: nothing reaches the file until
    the block ends, then all of it in one durable append; an exception inside writes nothing."""

    def __init__(self, path):
        self.path = path
        self._parts: list[str] = []
        self.closed = False

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:  # the data is written whole on close, never in pieces
        pass

    def close(self) -> None:
        from launch.jsonl_log import append_line

        if not self.closed:
            self.closed = True
            text = "".join(self._parts)
            if text:
                append_line(self.path, text)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.closed = True  # a record that failed half-way is dropped, not torn


def durable_open(file, mode="r", *args, **kwargs):
    if mode in ("a", "at") and not args:
        return DurableAppend(file)
    return builtins.open(file, mode, *args, **kwargs)


def _patch(mod: ModuleType) -> None:
    mod.open = durable_open  # module globals shadow the builtin for that module's code only


def apply() -> None:
    for name in MODULES:
        when_imported(name, _patch)
