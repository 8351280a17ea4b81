"""``kql serve``: a page for people who do not type queries (the Krypton demo).

The page picks an image, a model, patch, stride and mode, and a crop; it
shows the EXPLAIN estimate, runs the query in a queue with progress and
Cancel, and overlays the heatmap. See docs/web.md.

- :mod:`kql.web.app` the ASGI app (Starlette) and the ``kql serve`` command;
- :mod:`kql.web.engine` requests -> validated KQL through the Python API;
- :mod:`kql.web.jobs` the one-at-a-time job queue;
- :mod:`kql.web.uploads` upload checks and decoding.
"""
from __future__ import annotations

__all__ = ["create_app", "main"]


def create_app(*args, **kwargs):
    from kql.web.app import create_app as _create_app
    return _create_app(*args, **kwargs)


def main(argv=None) -> int:
    from kql.web.app import main as _main
    return _main(argv)
