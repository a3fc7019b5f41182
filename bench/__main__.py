import sys

from bench.cli import run

sys.exit(run())
