"""The one entry point of every FastChat process (controller, workers, API server, UI).

    python -m launch.fastchat_entry fastchat.serve.model_worker --model-path ... [FastChat args]

It applies the project's runtime patches and registers the project's model adapters, then
runs the FastChat service, so patches and adapters are active in every process.
"""

from __future__ import annotations

import importlib
import runpy
import sys

# FastChat services whose __main__ block is "parse args, build the global object, uvicorn.run(app)".
# We call the factory on the *imported* module instead of re-running it as __main__ with runpy:
# runpy would execute a second copy of the module, and patches applied to the imported module
# (its FastAPI `app`, its functions) would not be the ones serving requests.
# module -> (factory function, module global the factory's object must be stored in)
UVICORN_SERVICES: dict[str, tuple[str, str | None]] = {
    "fastchat.serve.controller": ("create_controller", "controller"),
    "fastchat.serve.model_worker": ("create_model_worker", "worker"),
    "fastchat.serve.openai_api_server": ("create_openai_api_server", None),
}


def prepare_process() -> None:
    """Everything a FastChat process needs before FastChat's own code runs.

    Thread counts are not set here: a worker's come from OMP_NUM_THREADS, which the OpenMP runtime and torch
    read themselves, and the project's worker also takes `--threads` (launch/services.py worker_env says why).
    """
    from launch.fastchat_patches import apply_all

    apply_all()  # the adapter_dispatch patch registers the project's adapters


def _run_uvicorn_service(module_name: str) -> None:
    import uvicorn

    factory_name, global_name = UVICORN_SERVICES[module_name]
    mod = importlib.import_module(module_name)
    result = getattr(mod, factory_name)()
    if global_name is None:
        args = result
    else:
        args, obj = result
        setattr(mod, global_name, obj)
    uvicorn.run(mod.app, host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m launch.fastchat_entry <module> [args...]")
    module, args = argv[0], argv[1:]
    prepare_process()
    sys.argv = [module, *args]
    if module in UVICORN_SERVICES:
        _run_uvicorn_service(module)
    else:
        # The UI's __main__ block is long; its patches target the sibling modules it imports.
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
