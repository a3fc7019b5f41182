"""A bench child process that loads a model once, then answers one JSON request per line on its stdin with one
marked JSON line on its stdout (other libraries may print there too); idle in between, so that nothing it holds
computes while the parent measures something else."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Child:
    def __init__(self, cmd: list[str], env: dict[str, str], mark: str, what: str):
        self.mark, self.what = mark, what
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=env, cwd=REPO)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(self.mark):
                return json.loads(line[len(self.mark):])
        self.err.seek(0)
        tail = self.err.read()[-2000:]
        raise RuntimeError(f"the {self.what} process ended (exit {self.proc.wait()}): {tail}")

    def ask(self, request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()
        self.err.close()
