"""``rnnserve serve`` with every model call answered by zeros: a diagnostic, never for serving.

Everything but onnxruntime runs as in the real server: transport, adapters, sessions, batching,
state gather and scatter, metrics. A load against it, beside the real server and the no-op
transport server (``bench.noop_server``), splits a latency or CPU figure into the transport's
share, the rest of the server's and the model call's (docs/PERFORMANCE.md)::

    python scripts/bench_ab.py --rate 2700 default zero-model noop

Run directly from the checkout root: ``python -m bench.zero_model_server serve [rnnserve serve
options]``. The server runs its models with :class:`ZeroRuntime`, passed to
:class:`service.server.RnnServer` as its runtime class; nothing in ``service`` is patched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from service.runtime import ModelRuntime


class ZeroRuntime(ModelRuntime):
    """A :class:`ModelRuntime` whose :meth:`run` returns what the model would, in shapes and
    types, with every value zero. The model is still loaded (its output width comes from it, and
    start-up checks and cost measurements go through :meth:`run` like any call)."""

    @cached_property
    def output_width(self) -> int:
        """Output features per step: the last axis of the model's first output."""
        return int(self.session.get_outputs()[0].shape[-1])

    def run(
        self, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        y = np.zeros((x.shape[0], x.shape[1], self.output_width), np.float32)
        return y, [np.zeros_like(state) for state in states]

    def run_bound(
        self, x: np.ndarray, states: Sequence[Any], single_thread: bool = False
    ) -> tuple[np.ndarray, list[Any]]:
        """With the state on the device: zeros out, the states handed back as they came."""
        y = np.zeros((x.shape[0], x.shape[1], self.output_width), np.float32)
        return y, list(states)


def build_parser() -> argparse.ArgumentParser:
    """``serve`` and every ``rnnserve serve`` flag, as ``rnnserve`` parses them."""
    from service.cli import add_settings_flags

    parser = argparse.ArgumentParser(
        prog="python -m bench.zero_model_server",
        description="rnnserve serve with every model call answered by zeros (a diagnostic)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model repository, every output zero")
    add_settings_flags(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, as ``rnnserve serve`` does, with :class:`ZeroRuntime`."""
    from service.cli import settings_from
    from service.event_loop import run as run_event_loop
    from service.logs import configure_logging
    from service.server import RnnServer

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as error:  # as rnnserve reports settings that fail validation
        print(f"zero_model_server: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_event_loop(
            RnnServer(settings, runtime_class=ZeroRuntime).serve_until_signal(),
            settings.event_loop,
            settings.gil_switch_interval_s,
        )
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
