"""`python -m launch worker` / `make worker ARGS=...`: one model worker on this host joining a
(possibly remote) controller.

    python -m launch worker --config deploy/models.toml --model smollm2-135m \\
        --controller-url http://10.0.0.1:21001 --advertise-host 10.0.0.2

The worker binds --host (default: the advertised address), registers under
http://<advertise-host>:<port>, and runs in the foreground; Ctrl-C stops it and removes it from
the controller at once. The controller host must run with server.expose_internal = true (its
controller port reachable from here), and this host's worker port must be reachable from the
controller's and the API server's host.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from launch import probes
from launch.config import ArenaConfig, ConfigError
from launch.fastchat_patches.api_guard.controller_client import remove_worker
from launch.services import process_env, worker_spec


def build_parser(cfg: ArenaConfig) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=[m.name for m in cfg.models],
                   help="a model entry of the config")
    p.add_argument("--controller-url", default=cfg.controller_url(), help="e.g. http://10.0.0.1:21001")
    p.add_argument("--advertise-host", required=True,
                   help="this host's address as the controller and API server reach it")
    p.add_argument("--host", default=None, help="address to bind (default: --advertise-host)")
    p.add_argument("--port", type=int, default=None, help="worker port (default: the model's port in the config)")
    return p


def main(cfg: ArenaConfig, argv: list[str]) -> int:
    args = build_parser(cfg).parse_args(argv)
    model = cfg.model(args.model)
    controller = args.controller_url.rstrip("/")
    if not probes.http_ok(f"{controller}/test_connection", timeout=5.0):
        raise ConfigError(f"no controller answers at {controller}; start the stack there with "
                          "server.expose_internal = true, and check the address and firewall")
    cfg.check_paths()
    spec = worker_spec(cfg, model, controller_url=controller, advertise_host=args.advertise_host,
                       host=args.host or args.advertise_host, port=args.port)
    print(f"worker {model.name}: binding {args.host or args.advertise_host}:{spec.port}, "
          f"registering as {spec.worker_url} with {controller}", flush=True)
    proc = subprocess.Popen(spec.argv, env=process_env(cfg, spec), stdin=subprocess.DEVNULL,
                            start_new_session=True)

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Leave no dead address behind: the controller would route to it until heartbeat expiry.
        remove_worker(controller, spec.worker_url)
    print(f"worker {model.name} exited with code {code}", file=sys.stderr)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else 1
