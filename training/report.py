"""The results table (markdown) and the plots (PNG) written by ``python -m training report``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FuncFormatter

from training.gradients import gradient_ratios
from training.models import CellType, InitMode, ModelConfig, RecurrentNet
from training.recipes import EXPERIMENTS
from training.tasks.co2 import CO2Task
from training.tasks.timer import TimerTask
from training.train import TEST_SEED, load_checkpoint

logger = logging.getLogger(__name__)

TASK_TITLES = {
    "adding": "Adding problem, T=100",
    "temporal_order": "Temporal order 6a",
    "timer": "Jaeger's timer, scale 100",
    "reber": "Continual embedded Reber",
    "co2": "Mauna Loa CO2, one step ahead",
}
CELL_LABELS = {"rnn": "RNN", "lstm": "LSTM", "lstm_nofg": "LSTM, no forget gate", "gru": "GRU"}
CELL_COLORS = {
    "RNN": "tab:green",
    "LSTM": "tab:blue",
    "GRU": "tab:orange",
    "LSTM, no forget gate": "tab:red",
    "LSTM (PyTorch init)": "tab:purple",
}


def load_results(runs_dir: Path) -> list[dict[str, Any]]:
    """Results of the recipe runs present in ``runs_dir``, in recipe order."""
    results = []
    for experiment in EXPERIMENTS:
        path = runs_dir / experiment.run_name / "results.json"
        if path.exists():
            record = json.loads(path.read_text())
            record["run_name"] = experiment.run_name
            results.append(record)
    return results


def cell_label(record: dict[str, Any]) -> str:
    label = CELL_LABELS[record["cell"]]
    if record["model"]["init"] == "default":
        label += " (PyTorch init)"
    return label


def error_column(record: dict[str, Any]) -> str:
    test = record["test"]
    if record["task"] == "co2":
        return (
            f"RMSE {test['rmse_ppm']:.3f} ppm (seasonal naive {test['seasonal_naive_rmse_ppm']:.3f},"
            f" persistence {test['persistence_rmse_ppm']:.3f})"
        )
    if record["task"] == "timer":
        return f"{test['errors']}/{test['total']} pulses wrong"
    if record["task"] == "reber":
        return (
            f"{test['errors']}/{test['total']} strings wrong over {int(test['symbols']):,} symbols"
        )
    return f"{test['errors']}/{test['total']} sequences wrong"


def results_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | cell | solved? | sequences to solve | wall time (s) | test errors | test MSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        to_solve = f"{r['sequences_to_solve']:,}" if r["sequences_to_solve"] else "—"
        lines.append(
            f"| {TASK_TITLES[r['task']]} | {cell_label(r)} | {'yes' if r['solved'] else '**no**'} "
            f"| {to_solve} | {r['wall_time_s']:.0f} | {error_column(r)} | {r['test']['mse']:.3g} |"
        )
    return "\n".join(lines) + "\n"


LEARNING_CURVE_COLUMNS = 2  # 8 inches at 110 dpi: 880 px, readable at a README's width


def plot_learning_curves(results: list[dict[str, Any]], path: Path) -> None:
    """One panel per task, two panels a row (a single row of five was 2,300 px wide)."""
    tasks = [t for t in TASK_TITLES if any(r["task"] == t for r in results)]
    columns = min(LEARNING_CURVE_COLUMNS, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for r in (r for r in results if r["task"] == task):
            seqs = [p["sequences"] for p in r["curve"]]
            mse = [max(p["val_mse"], 1e-7) for p in r["curve"]]
            label = cell_label(r)
            ax.plot(seqs, mse, label=label, color=CELL_COLORS.get(label))
        ax.set_yscale("log")
        ax.set_title(TASK_TITLES[task], fontsize=10)
        ax.xaxis.set_major_formatter(FuncFormatter(thousands))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("validation MSE")
    fig.supxlabel("training sequences (stream tasks: chunks of one lane)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def thousands(value: float, _position: int) -> str:
    """An axis tick in thousands (``120k``): full numbers overlap on a narrow panel."""
    return f"{value / 1000:g}k" if value else "0"


def plot_vanishing_gradients(runs_dir: Path, path: Path) -> None:
    variants: list[tuple[str, CellType, InitMode, str]] = [
        ("RNN (tanh)", "rnn", "keep", "adding-rnn"),
        ("LSTM, PyTorch init", "lstm", "default", "adding-lstm_defaultinit"),
        ("LSTM, forget bias +5", "lstm", "keep", "adding-lstm"),
        ("GRU, update bias +5", "gru", "keep", "adding-gru"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, cell, init, run_name in variants:
        torch.manual_seed(0)
        fresh = RecurrentNet(
            ModelConfig(cell=cell, input_size=2, output_size=1, hidden_size=32, init=init)
        )
        axes[0].plot(np.maximum(gradient_ratios(fresh), 1e-30), label=label)
        checkpoint = runs_dir / run_name / "checkpoint.pt"
        if checkpoint.exists():
            axes[1].plot(
                np.maximum(gradient_ratios(load_checkpoint(checkpoint)), 1e-30), label=label
            )
    for ax, title in zip(
        axes, ("at initialisation", "after training on the adding problem"), strict=True
    ):
        ax.set_yscale("log")
        ax.set_xlabel("k (steps before the loss)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||dL/dh(T-k)|| / ||dL/dh(T)||")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timer(runs_dir: Path, path: Path, steps: int = 1500) -> None:
    task = TimerTask()
    x, y = task.test_stream(TEST_SEED, lanes=1, steps=steps)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(y[0, :, 0], color="black", lw=2, label="target")
    for run_name, label in (("timer-lstm", "LSTM"), ("timer-gru", "GRU"), ("timer-rnn", "RNN")):
        checkpoint = runs_dir / run_name / "checkpoint.pt"
        if checkpoint.exists():
            with torch.no_grad():
                pred, _ = load_checkpoint(checkpoint)(torch.from_numpy(x))
            ax.plot(pred[0, :, 0].numpy(), lw=1, label=label)
    triggers = np.flatnonzero(x[0, :, 0] > 0.5)
    ax.vlines(triggers, -0.1, 0.65, colors="grey", linestyles=":", lw=0.8, label="trigger")
    ax.set_xlabel("step (one stream, never reset)")
    ax.set_ylabel("output")
    ax.set_title("Jaeger's timer: hold 0.5 for 100·u2 steps after each trigger")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_co2(runs_dir: Path, path: Path) -> None:
    task = CO2Task()
    v = task.readings_ppm
    weeks = np.arange(task.split, len(v))
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.plot(weeks, v[weeks], color="black", lw=1.5, label="measured")
    ax.plot(weeks, v[weeks - 52], lw=0.8, label="seasonal naive (52 weeks earlier)")
    for run_name, label in (("co2-lstm", "LSTM"), ("co2-gru", "GRU")):
        checkpoint = runs_dir / run_name / "checkpoint.pt"
        if checkpoint.exists():
            ax.plot(
                weeks,
                task.forecast_ppm(load_checkpoint(checkpoint))[weeks - 2],
                lw=0.9,
                label=label,
            )
    ax.set_xlabel("week since March 1958 (test weeks)")
    ax.set_ylabel("CO2 (ppm)")
    ax.set_title("Mauna Loa CO2: one-step-ahead forecasts, streamed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs_dir: Path, docs_dir: Path) -> list[Path]:
    """Write ``results.md`` and the PNG plots into ``docs_dir``; return the paths written."""
    results = load_results(runs_dir)
    if not results:
        raise FileNotFoundError(
            f"no results.json under {runs_dir}; run `python -m training experiments`"
        )
    images = docs_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    md = docs_dir / "results.md"
    md.write_text(
        "# Training results\n\n"
        "Generated by `python -m training experiments && python -m training report` "
        "(see docs/TRAINING.md). Test errors are judged on a fresh held-out set "
        f"(seed {TEST_SEED}) by each task's criterion.\n\n" + table + "\n"
        "## Learning curves\n\nValidation MSE against training sequences (stream tasks: chunks of "
        "one lane). Runs stop when the criterion is met on the validation set.\n\n"
        "![learning curves](images/learning_curves.png)\n\n"
        "## Vanishing gradients\n\n||dL/dh(T-k)|| / ||dL/dh(T)|| for a loss at the last step of "
        "100-step adding sequences, hidden 32, at initialisation (seed 0) and after training. "
        "Gradients that underflow float32 to zero are drawn at 1e-30.\n\n"
        "![vanishing gradients](images/vanishing_gradients.png)\n\n"
        "## Jaeger's timer\n\nTargets and predictions of the trained models over the first 1500 "
        "steps of a fresh test stream, from zero state, never reset.\n\n"
        "![timer](images/timer_stream.png)\n\n"
        "## Mauna Loa CO2\n\nOne-step-ahead forecasts over the test weeks (the last 20%), the "
        "model streaming the whole series from zero state.\n\n"
        "![co2](images/co2_forecast.png)\n"
    )
    written = [md]
    plots = {
        "learning_curves.png": lambda p: plot_learning_curves(results, p),
        "vanishing_gradients.png": lambda p: plot_vanishing_gradients(runs_dir, p),
        "timer_stream.png": lambda p: plot_timer(runs_dir, p),
        "co2_forecast.png": lambda p: plot_co2(runs_dir, p),
    }
    for name, plot in plots.items():
        plot(images / name)
        written.append(images / name)
    return written
