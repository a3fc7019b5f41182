"""The Gradio page loads nothing from other hosts.

gradio 5.50's index.html loads iframeResizer from cdnjs.cloudflare.com and preconnects to
fonts.googleapis.com / fonts.gstatic.com. Offline, the script request hangs or fails (and reveals
the user to a third party online). iframeResizer only matters when the page is embedded in an
iframe on another site, which this deployment never is, so we drop those tags from the template.
(The theme's web fonts are replaced by system fonts in launch/ui/theme.py.) Upstream:
gradio-app/gradio#4332 (offline use, fonts and CDN scripts).
"""

from __future__ import annotations

import re

UPSTREAM = "https://github.com/gradio-app/gradio/issues/4332"
_OUTSIDE_TAGS = re.compile(
    r"<script\b[^>]*\bsrc=\"https?://[^\"]+\"[^>]*>\s*</script>"
    r"|<link\b[^>]*\bhref=\"https?://[^\"]+\"[^>]*/?>",
    re.S,
)


def strip_outside_tags(html: str) -> str:
    return _OUTSIDE_TAGS.sub("", html)


def _patch(routes) -> None:
    env = routes.templates.env
    if getattr(env.loader, "_cpu_arena_offline", False):
        return
    from jinja2 import BaseLoader

    inner = env.loader

    class OfflineLoader(BaseLoader):
        _cpu_arena_offline = True

        def get_source(self, environment, template):
            source, filename, uptodate = inner.get_source(environment, template)
            if template.endswith(".html"):
                source = strip_outside_tags(source)
            return source, filename, uptodate

    env.loader = OfflineLoader()
    env.cache.clear() if env.cache is not None else None


def apply() -> None:
    from launch.fastchat_patches.api_guard.on_import import when_imported

    when_imported("gradio.routes", _patch)
