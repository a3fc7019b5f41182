"""The supervisor: a detached process that starts every service, waits until the stack is ready,
restarts crashed services with backoff, and stops them all on SIGTERM.

`make up` starts it and watches state.json; `make down` sends it SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from launch import probes
from launch.config import ArenaConfig
from launch.fastchat_patches.api_guard.controller_client import remove_worker
from launch.services import ServiceSpec, build_services, process_env
from launch.state import RunState, ServiceState, log_path, write_state


@dataclass
class Child:
    spec: ServiceSpec
    state: ServiceState
    proc: subprocess.Popen | None = None
    next_restart: float = 0.0


def port_problems(cfg: ArenaConfig) -> list[str]:
    """Ports already taken by someone else: refuse before starting anything."""
    out = []
    public = ("server.api_port", "server.ui_port")
    for label, port in cfg.ports().items():
        # Controller and workers bind server.internal_host() (loopback unless expose_internal).
        host = cfg.server.host if label in public else cfg.server.internal_host()
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                out.append(f"{cfg.source}: {label} = {port} is already in use ({e.strerror}); "
                           "stop what uses it (`make down`?) or choose another port in the config")
    return out


class Supervisor:
    def __init__(self, cfg: ArenaConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir()
        self.children = {
            spec.name: Child(spec, ServiceState(name=spec.name, port=spec.port, model=spec.model,
                                                log=str(log_path(self.run_dir, spec.name))))
            for spec in build_services(cfg)
        }
        self.state = RunState(config=str(cfg.source), supervisor_pid=os.getpid(),
                              services={n: c.state for n, c in self.children.items()},
                              urls={"api": cfg.api_url(), "ui": cfg.ui_url(),
                                    "controller": cfg.controller_url()})
        self.stopping = False

    # ---- process control ----
    def _spawn(self, child: Child) -> None:
        log = log_path(self.run_dir, child.spec.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {child.spec.name}\n".encode())
            out.flush()
            child.proc = subprocess.Popen(
                child.spec.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=process_env(self.cfg, child.spec), cwd=self.run_dir,  # stray relative writes land in the run folder
                start_new_session=True,  # own process group: we can stop it and its children together
            )
        child.state.pid = child.proc.pid
        child.state.started_at = time.time()
        child.state.status = "starting"

    def _stop_all(self) -> None:
        from launch.state import terminate

        # Reverse order: UI and API first, the controller last.
        for child in reversed(list(self.children.values())):
            if child.proc and child.proc.poll() is None:
                terminate(child.proc.pid)
                child.proc.wait(timeout=5)
            if child.state.status != "failed":
                child.state.status = "stopped"
        self.save()

    def save(self) -> None:
        write_state(self.run_dir, self.state)

    def _on_sigterm(self, *_: object) -> None:
        self.stopping = True

    # ---- phases ----
    def start(self) -> bool:
        order = ["controller"] + [n for n in self.children if n.startswith("worker:")] + ["api", "ui"]
        self._spawn(self.children["controller"])
        self.save()
        controller = self.children["controller"]
        # Importing FastChat takes 20-40 s on a loaded 2-core machine; a crash ends the wait at once.
        self._wait(lambda: probes.http_ok(controller.spec.health_url) or controller.proc.poll() is not None,
                   min(120.0, self.cfg.server.startup_timeout))
        if not probes.http_ok(controller.spec.health_url):
            return self._fail("controller did not answer")
        for name in order[1:]:
            self._spawn(self.children[name])
        self.save()
        deadline = time.monotonic() + self.cfg.server.startup_timeout
        while time.monotonic() < deadline and not self.stopping:
            for child in self.children.values():
                if child.proc.poll() is not None:
                    return self._fail(f"{child.spec.name} exited with code {child.proc.returncode} during startup")
            ready = self._readiness()
            self.save()
            if ready:
                self.state.phase = "ready"
                self.state.message = "all services ready"
                self.save()
                return True
            time.sleep(1.0)
        if self.stopping:
            return self._fail("stopped during startup")
        return self._fail(f"not ready within startup_timeout = {self.cfg.server.startup_timeout:.0f} s")

    def _readiness(self) -> bool:
        registered = probes.controller_models(self.cfg.controller_url())
        listed = probes.api_models(self.cfg.api_url(), self.cfg.server.resolved_api_keys())
        for child in self.children.values():
            spec = child.spec
            if spec.kind == "worker":
                ok = spec.model in registered
            elif spec.kind == "api":
                ok = listed is not None and all(m.name in listed for m in self.cfg.models)
            else:
                ok = probes.http_ok(spec.health_url)
            child.state.status = "ready" if ok else "starting"
        return all(c.state.status == "ready" for c in self.children.values())

    def _fail(self, message: str) -> bool:
        self.state.message = message
        for child in self.children.values():
            if child.proc and child.proc.poll() is not None and child.state.status != "stopped":
                child.state.status = "failed"
        self.state.phase = "stopping"
        self.save()
        self._stop_all()
        # Only now: `up` returns as soon as it reads "failed", and nothing may be left running then.
        self.state.phase = "failed"
        self.save()
        return False

    def _wait(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if cond():
                return True
            time.sleep(0.2)
        return False

    def watch(self) -> None:
        """After startup: restart what crashes, with exponential backoff, until SIGTERM."""
        s = self.cfg.server
        while not self.stopping:
            now = time.monotonic()
            for child in self.children.values():
                proc = child.proc
                if proc is None or proc.poll() is None:
                    if child.state.status == "restarting" and proc is not None:
                        child.state.status = "ready" if self._child_ready(child) else "restarting"
                    continue
                if child.next_restart == 0.0:
                    if child.spec.worker_url:
                        # The controller would keep routing to it until the heartbeat expires.
                        remove_worker(self.cfg.controller_url(), child.spec.worker_url)
                    delay = min(s.restart_backoff_initial * 2 ** child.state.restarts, s.restart_backoff_max)
                    child.next_restart = now + delay
                    child.state.status = "restarting"
                    self.save()
                elif now >= child.next_restart:
                    child.state.restarts += 1
                    child.next_restart = 0.0
                    self._spawn(child)
                    child.state.status = "restarting"
                    self.save()
            self.save()
            time.sleep(0.5)

    def _child_ready(self, child: Child) -> bool:
        if child.spec.kind == "worker":
            return child.spec.model in probes.controller_models(self.cfg.controller_url())
        return probes.http_ok(child.spec.health_url)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.start():
            return 1
        self.watch()
        self.state.phase = "stopping"
        self.save()
        self._stop_all()
        self.state.phase = "stopped"
        self.save()
        return 0


def main(config_path: str | None) -> int:
    from launch.config import current_config

    return Supervisor(current_config(config_path)).run()
