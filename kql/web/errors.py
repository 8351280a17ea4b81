"""The one error the web layer raises on purpose."""
from __future__ import annotations


class WebError(Exception):
    """A bad request, answered as ``{"error": message}`` with ``status``.

    The message is one line written for the person at the page; it never
    carries a traceback or a server path.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
