"""`python -m launch <command>`: up, down, status, logs, check, supervise, models.

Thin: each command loads the config, then calls the module that does the work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from launch import probes
from launch.config import ArenaConfig, ConfigError, current_config
from launch.state import is_ours, pid_alive, read_state, terminate


def _tail(path: str | Path | None, lines: int = 30) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_check(cfg: ArenaConfig, args) -> int:
    cfg.check_paths()
    cfg.check_exposure()
    from launch.memory_check import enforce

    enforce(cfg, skip=getattr(args, "skip_memory_check", False))
    from launch.supervisor import port_problems

    problems = port_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    print(f"{cfg.source}: OK ({len(cfg.models)} models)")
    return 0


def cmd_up(cfg: ArenaConfig, args) -> int:
    run_dir = cfg.run_dir()
    old = read_state(run_dir)
    if old and is_ours(old.supervisor_pid):
        print(f"already running (supervisor pid {old.supervisor_pid}); `make status` or `make down`")
        return 0 if old.phase == "ready" else 1
    cmd_check(cfg, args)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "state.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(run_dir / "logs" / "supervisor.log", "ab") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "launch", "supervise", "--config", str(cfg.source)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    print(f"starting {len(cfg.models) + 3} services (supervisor pid {sup.pid}); logs in {run_dir / 'logs'}")
    seen: dict[str, str] = {}
    while True:
        time.sleep(1.0)
        state = read_state(run_dir)
        if state:
            for name, svc in state.services.items():
                if seen.get(name) != svc.status:
                    seen[name] = svc.status
                    print(f"  [{time.monotonic() - t0:5.0f}s] {name:<28} {svc.status}")
            if state.phase == "ready":
                print(f"ready in {time.monotonic() - t0:.0f} s")
                print(f"  Web UI      {cfg.ui_url()}")
                print(f"  OpenAI API  {cfg.api_url()}   models: {', '.join(m.name for m in cfg.models)}")
                print(f"  controller  {cfg.controller_url()}")
                return 0
            if state.phase == "failed":
                return _report_failure(state)
        if sup.poll() is not None:
            state = read_state(run_dir)
            if state and state.phase == "failed":
                return _report_failure(state)
            print(f"supervisor exited with code {sup.returncode}:\n{_tail(run_dir / 'logs' / 'supervisor.log')}")
            return 1


def _report_failure(state) -> int:
    print(f"FAILED: {state.message}; everything started was stopped.")
    for svc in state.services.values():
        if svc.status == "failed":
            print(f"\n--- {svc.name}: last lines of {svc.log}\n{_tail(svc.log)}")
    return 1


def cmd_down(cfg: ArenaConfig, args) -> int:
    run_dir = cfg.run_dir()
    state = read_state(run_dir)
    if state is None:
        print("nothing to stop (no run state)")
        return 0
    stopped = 0
    if is_ours(state.supervisor_pid):
        terminate(state.supervisor_pid, grace=60.0)
        stopped += 1
    # Whatever the supervisor did not stop (it was killed, say): stop by pid, ours only.
    for svc in state.services.values():
        if is_ours(svc.pid):
            terminate(svc.pid)
            stopped += 1
    alive = [s.name for s in state.services.values() if pid_alive(s.pid) and is_ours(s.pid)]
    if alive:
        print(f"could not stop: {alive}")
        return 1
    print("stopped" if stopped else "nothing was running")
    return 0


def cmd_status(cfg: ArenaConfig, args) -> int:
    state = read_state(cfg.run_dir())
    if state is None:
        print("not running (no run state)")
        return 3
    registered = probes.controller_models(cfg.controller_url())
    print(f"phase: {state.phase}  supervisor pid {state.supervisor_pid} "
          f"({'alive' if pid_alive(state.supervisor_pid) else 'dead'})  {state.message}")
    print(f"{'service':<28} {'pid':>7} {'port':>6} {'alive':>6} {'status':<11} {'restarts':>8}  registered")
    for svc in state.services.values():
        reg = ("yes" if svc.model in registered else "no") if svc.model else ""
        alive = "yes" if pid_alive(svc.pid) else "no"
        print(f"{svc.name:<28} {svc.pid or '-':>7} {svc.port or '-':>6} {alive:>6} {svc.status:<11} "
              f"{svc.restarts:>8}  {reg}")
    print(f"registered models: {', '.join(sorted(registered)) or '(none)'}")
    return 0 if state.phase == "ready" else 1


def cmd_logs(cfg: ArenaConfig, args) -> int:
    logs = sorted((cfg.run_dir() / "logs").glob("*.log"))
    if not logs:
        print("no logs yet")
        return 0
    if args.follow:
        return subprocess.call(["tail", "-n", str(args.lines), "-F", *map(str, logs)])
    for log in logs:
        print(f"==> {log} <==\n{_tail(log, args.lines)}\n")
    return 0


def cmd_supervise(cfg: ArenaConfig, args) -> int:
    from launch.supervisor import Supervisor

    return Supervisor(cfg).run()


# Commands owned by their own module: `python -m launch <cmd> --config X [args...]` calls
# `<module>.main(cfg, argv)`, and that module parses its own options.
DELEGATED = {
    "download": ("launch.download", "download a seed model from ModelScope (MODEL=name)"),
    "worker": ("launch.remote_worker", "run one model worker that joins a (possibly remote) controller"),
}


COMMANDS = {
    "up": (cmd_up, "start every service and wait until ready"),
    "down": (cmd_down, "stop exactly what `up` started"),
    "status": (cmd_status, "pid, port, liveness and registration of each service"),
    "logs": (cmd_logs, "tail the service logs"),
    "check": (cmd_check, "validate the config, model paths and ports without starting anything"),
    "supervise": (cmd_supervise, "(internal) the supervisor process `up` starts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="config file (default deploy/models.toml)")
        if name in ("check", "up"):
            p.add_argument("--skip-memory-check", action="store_true",
                           help="start even when the models' weights plus overhead exceed the memory available")
        if name == "logs":
            p.add_argument("-n", "--lines", type=int, default=40)
            p.add_argument("-f", "--follow", action="store_true")
    for name, (_, help_) in DELEGATED.items():
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("--config", default=None)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse's REMAINDER does not take options ("--quick") right after the subcommand's own:
    # a delegated command gets every argument the parser does not know.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command not in DELEGATED:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = [*unknown, *args.rest]
    try:
        cfg = current_config(args.config)
        if args.command in DELEGATED:
            import importlib

            module = importlib.import_module(DELEGATED[args.command][0])
            return module.main(cfg, args.rest)
        return COMMANDS[args.command][0](cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
