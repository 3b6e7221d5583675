"""Structured logging: one JSON object per line (or plain text for a terminal).

Log records carry model labels, counts and reasons, never input data or session state.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# onnxruntime's own logger (C++, writing coloured lines straight to stderr) reports errors only:
# its warnings (an unused initializer, a device it could not probe) would break the one JSON
# object per line of ``--log-format json``, and what matters to an operator reaches this log
# anyway (a model that cannot load, a provider that is missing, as errors of our own).
ONNXRUNTIME_LOG_SEVERITY = 3  # 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def quiet_onnxruntime() -> None:
    """Set onnxruntime's default logger to errors only, before it creates its environment (the
    first session), so that nothing it says at start-up but an error reaches stderr."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(ONNXRUNTIME_LOG_SEVERITY)


def configure_logging(level: str, fmt: str) -> None:
    quiet_onnxruntime()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
