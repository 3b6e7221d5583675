"""The replies of one tritonclient stream, collected by its callback, for the tritonclient
probes (run as scripts beside the server; imports nothing from the service)."""

from __future__ import annotations

import threading
from typing import Any


class StreamReplies:
    """Pass :meth:`callback` to ``start_stream``: each reply is kept under its request id (as
    ``keep(result)`` makes it), each error's text in :attr:`errors`."""

    def __init__(self, keep: Any = lambda result: result) -> None:
        self.keep = keep
        self.replies: dict[str, Any] = {}
        self.errors: list[str] = []
        self._done = threading.Condition()

    def callback(self, result: Any, error: Any) -> None:
        with self._done:
            if error is not None:
                self.errors.append(str(error))
            else:
                self.replies[result.get_response().id] = self.keep(result)
            self._done.notify_all()

    def wait(self, count: int, timeout_s: float) -> None:
        """Until ``count`` replies or errors came, or ``timeout_s`` passed."""
        with self._done:
            self._done.wait_for(lambda: len(self.replies) + len(self.errors) >= count, timeout_s)
