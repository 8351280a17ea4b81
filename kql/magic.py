"""``%kql`` and ``%%kql``: queries in IPython and Jupyter, with the notebook's
variables as bindings (like jupysql's ``%sql``).

    %load_ext kql.magic
    r = %kql SELECT HEATMAP FROM img USING net PATCH 8 STRIDE 4 LABEL TOP 3

    %%kql
    SET batch_size = 32;
    EXPLAIN SELECT HEATMAP FROM img USING net PATCH 8 STRIDE 4;

A name the query uses that is a variable of the notebook holding an image
(numpy array, PIL image, tensor) or a model (``torch.nn.Module``) is bound
for that query (``Connection.execute(..., name=value)``); other names resolve
as in any session (``LOAD``, samples, built-in models). One session lasts as
long as the kernel: :func:`connection`.
"""
from __future__ import annotations

import re
from typing import Any, Optional

__all__ = ["connection", "load_ipython_extension", "bindings_from"]

_CONNECTION = None
_NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def connection():
    """The kernel's session (created on first use, progress bars off)."""
    global _CONNECTION
    if _CONNECTION is None:
        import kql
        _CONNECTION = kql.connect(progress="off")
    return _CONNECTION


def bindings_from(text: str, namespace: dict) -> dict:
    """The variables of ``namespace`` that ``text`` names and that a query
    can bind: arrays, tensors, PIL images and modules."""
    import numpy as np
    import torch
    kinds: tuple = (np.ndarray, torch.Tensor, torch.nn.Module)
    try:
        from PIL import Image
        kinds += (Image.Image,)
    except ImportError:  # pragma: no cover - Pillow is a dependency of scikit-image
        pass
    text = re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", " ", text)  # not inside strings
    return {name: namespace[name] for name in set(_NAME.findall(text))
            if name in namespace and isinstance(namespace[name], kinds)}


def run(text: str, namespace: Optional[dict] = None) -> Any:
    """Run a script in the kernel's session; the last statement's result."""
    results = connection().executescript(text, **bindings_from(text, namespace or {}))
    return results[-1] if results else None


def load_ipython_extension(ipython) -> None:
    """``%load_ext kql.magic``: register ``%kql`` and ``%%kql``."""
    from IPython.core.magic import Magics, line_cell_magic, magics_class, needs_local_scope

    from kql.errors import KqlError

    @magics_class
    class KqlMagics(Magics):
        @needs_local_scope
        @line_cell_magic
        def kql(self, line: str, cell: Optional[str] = None, local_ns: Optional[dict] = None):
            """Run KQL; ``%kql <statement>`` or a ``%%kql`` cell of statements."""
            text = line if cell is None else (line + "\n" + cell)
            namespace = {**self.shell.user_ns, **(local_ns or {})}
            try:
                return run(text, namespace)
            except KqlError as e:     # one line, as in the kql shell, not a traceback
                print(f"error: {e}")
                return None

    ipython.register_magics(KqlMagics)
