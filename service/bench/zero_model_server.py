"""``rnnserve serve`` with every model call answered by zeros: a diagnostic, never for serving.

Everything but onnxruntime runs as in the real server: transport, adapters, sessions, batching,
state gather and scatter, metrics. A load against it, beside the real server and the no-op
transport server (``service.bench.noop_server``), splits a latency or CPU figure into the
transport's share, the rest of the server's and the model call's (docs/PERFORMANCE.md)::

    python scripts/bench_ab.py --rate 2700 default zero-model noop

Run directly: ``python -m service.bench.zero_model_server serve [rnnserve serve options]``.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence

import numpy as np

from service.runtime import ModelRuntime

_output_widths: weakref.WeakKeyDictionary[ModelRuntime, int] = weakref.WeakKeyDictionary()


def zero_run(
    runtime: ModelRuntime, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """What :meth:`ModelRuntime.run` returns, in shapes and types, with every value zero."""
    width = _output_widths.get(runtime)
    if width is None:
        width = _output_widths[runtime] = int(runtime.session.get_outputs()[0].shape[-1])
    y = np.zeros((x.shape[0], x.shape[1], width), np.float32)
    return y, [np.zeros_like(state) for state in states]


def main(argv: list[str] | None = None) -> int:
    from service import cli

    ModelRuntime.run = zero_run  # type: ignore[method-assign,assignment]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
