"""launch/ports.py: the private stacks of the bench and the tests get their own ports."""

from __future__ import annotations

import socket

from launch.ports import free_ports, on_free_ports


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_on_free_ports_moves_every_port_and_keeps_the_rest():
    server = {"host": "0.0.0.0", "controller_port": 21001, "api_port": 8000, "ui_port": 7860,
              "worker_base_port": 21002, "advertise_host": "10.0.0.5", "run_dir": "/tmp/x"}
    models = [{"name": "a", "port": 21002}, {"name": "b"}]
    new_server, new_models = on_free_ports(server, models)
    ports = [new_server[k] for k in ("controller_port", "api_port", "ui_port", "worker_base_port")]
    ports += [m["port"] for m in new_models]
    assert len(set(ports)) == 6 and not {21001, 8000, 7860, 21002} & set(ports)
    assert new_server["host"] == "127.0.0.1" and "advertise_host" not in new_server
    assert new_server["run_dir"] == "/tmp/x" and [m["name"] for m in new_models] == ["a", "b"]
    assert server["api_port"] == 8000 and models[0]["port"] == 21002  # the inputs are not changed
