"""``rnnserve stream``: a bundled model's demo streamed through a server, scored by the task's own
measure beside the model's documented test-set figure, optionally plotted."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli_client import connect
from service.errors import UsageError

if TYPE_CHECKING:
    from service._proto.rnnserve.v1 import streaming_pb2 as pb
    from service.client import Client
    from service.demo import DemoPlan, DemoScore


def matplotlib_missing() -> bool:
    """True when matplotlib (the ``plot`` extra) cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def check_plot_path(path: Path | None) -> int:
    """Before anything streams: 0 when ``--plot`` can be written, else 2 after one line saying why."""
    if path is None:
        return 0
    if matplotlib_missing():
        print("rnnserve: --plot needs matplotlib: pip install 'rnnserve[plot]'", file=sys.stderr)
        return 2
    if not path.parent.is_dir():
        print(f"rnnserve: --plot {path}: folder {path.parent} does not exist", file=sys.stderr)
        return 2
    return 0


def stream_sequences(client: Client, model: str, sequences: list[Any], chunk: int) -> list[Any]:
    """Stream each sequence through its own session (closed after it), ``chunk`` steps per
    message; the outputs [steps, outputs] of each."""
    import numpy as np

    outputs = []
    for inputs in sequences:
        with client.open_session(model) as session:
            parts = [
                session.step(inputs[start : start + chunk])
                for start in range(0, len(inputs), chunk)
            ]
        outputs.append(np.concatenate(parts))
    return outputs


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], show: int) -> None:
    """At most ``show`` rows, spread evenly over ``rows``, in aligned columns."""
    if show == 0 or not rows:
        return
    picked = rows if len(rows) <= show else [rows[i] for i in spread(len(rows), show)]
    widths = [max(len(r[c]) for r in (header, *picked)) for c in range(len(header))]
    for row in (header, *picked):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if len(picked) < len(rows):
        print(f"({len(picked)} of {len(rows)} rows; --show N for more)")


def spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included."""
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class StreamedDemo:
    """A demo streamed through the server: the model, the plan and its score."""

    model: pb.ModelInfo
    task: str
    plan: DemoPlan
    score: DemoScore


def stream_demo(client: Client, args: argparse.Namespace) -> StreamedDemo:
    """Stream the demo of ``args.model`` (its task's, or ``args.task``'s) and score it."""
    import json

    from service.demo import plan_for

    info = client.model(args.model)
    metadata = json.loads(info.metadata_json) if info.metadata_json else {}
    if args.task and info.task and args.task != info.task:
        raise UsageError(
            f"model {info.name} was trained on task {info.task!r}; --task {args.task} would score "
            "it on another task, against figures that are not its own (leave --task out)"
        )
    task = args.task or info.task
    plan = plan_for(task, metadata, steps=args.steps, sequences=args.sequences, seed=args.seed)
    outputs = stream_sequences(client, args.model, plan.sequences, args.chunk)
    return StreamedDemo(info, task, plan, plan.score(outputs))


def print_demo(demo: StreamedDemo, chunk: int, show: int) -> None:
    """What was streamed, a table of examples, and each measure beside the documented one."""
    info, plan = demo.model, demo.plan
    print(f"model {info.name}/{info.version} ({info.cell}), task {demo.task}: {plan.description}")
    print(plan.summary(chunk))
    for note in plan.notes:
        print(note)
    print_table(demo.score.header, demo.score.rows, show)
    for measure in demo.score.measures:
        print(measure.line())


def command_stream(args: argparse.Namespace) -> int:
    """Stream the model's demo through the server and compare the served outputs with the task's
    targets by the task's own measure, beside the model's documented test-set figure."""
    refused = check_plot_path(args.plot)
    if refused:
        return refused
    with connect(args, timeout_s=30) as client:
        demo = stream_demo(client, args)
    print_demo(demo, args.chunk, args.show)
    if args.plot:
        title = f"{demo.model.name}: {demo.plan.description}"
        plot_demo(args.plot, demo.score, title)
        print(f"plot written to {args.plot}")
    return 0


def plot_demo(path: Path, score: DemoScore, title: str) -> None:
    """A PNG of the score's curves (target and served prediction) against steps or sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.5))
    for index, (label, values) in enumerate(score.curves.items()):
        if score.markers:  # target as a ring, served value as a cross: both show where they agree
            ax.plot(values, "ox"[min(index, 1)], fillstyle="none", label=label, ms=8 - 3 * index)
        else:
            ax.plot(values, lw=1, alpha=0.8, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(score.x_label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
