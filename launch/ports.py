"""Free local TCP ports for the stacks the bench and the tests start."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n different free ports: every socket stays bound until all are chosen, because ports taken
    one at a time and released can come back twice (CI saw api_port == controller_port)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def on_free_ports(server: dict, models: list[dict]) -> tuple[dict, list[dict]]:
    """Copies of a config's [server] and model entries moved to free local ports (the bench's and
    the tests' private stacks), so they never meet a running `make up` or each other."""
    controller, api, ui, worker_base, *worker_ports = free_ports(4 + len(models))
    server = dict(server, host="127.0.0.1", controller_port=controller, api_port=api, ui_port=ui,
                  worker_base_port=worker_base)
    server.pop("advertise_host", None)
    return server, [dict(m, port=p) for m, p in zip(models, worker_ports, strict=True)]
