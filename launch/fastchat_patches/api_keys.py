"""API keys from the config or the environment, never from the command line.

FastChat's API server takes keys only as `--api-keys k1,k2`, which every user of the machine
reads in `ps`. The supervisor passes no keys on the command line; this patch has the server's
factory load them from server.api_keys / the variable named by server.api_keys_env
(CPU_ARENA_API_KEYS) instead, and refuses `--api-keys` outright.
"""

from __future__ import annotations

from types import ModuleType

from launch.fastchat_patches.api_guard.on_import import when_imported

UPSTREAM = "https://github.com/lm-sys/FastChat/blob/v0.2.36/fastchat/serve/openai_api_server.py#L897-L901"
MODULE = "fastchat.serve.openai_api_server"


def resolved_keys() -> tuple[str, ...]:
    from launch.config import current_config

    # Not optional: without the config this server cannot know its keys, and would serve without any.
    return current_config().server.resolved_api_keys()


def _patch(mod: ModuleType) -> None:
    if getattr(mod, "_cpu_arena_api_keys", False):
        return
    mod._cpu_arena_api_keys = True
    factory = mod.create_openai_api_server

    def create_openai_api_server():
        args = factory()
        if args.api_keys:
            raise SystemExit("refusing --api-keys on the command line (visible in `ps`); set "
                             "CPU_ARENA_API_KEYS=key1,key2 in the environment or server.api_keys in the config")
        keys = resolved_keys()
        mod.app_settings.api_keys = list(keys) or None
        mod.logger.info(f"API keys: {len(keys)} configured" if keys else "API keys: none (loopback only)")
        return args

    mod.create_openai_api_server = create_openai_api_server


def apply() -> None:
    when_imported(MODULE, _patch)
