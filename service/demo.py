"""Demo runs of ``rnnserve stream``: for each bundled task, inputs drawn as training/ draws them,
the task's own measure on the served outputs, and the model's documented test-set figure beside it.

numpy only: this runs on the serving side, where torch is not installed. The generators follow the
task definitions in training/tasks (docs/TRAINING.md) and read the task's settings from the
model's ``model.json`` (``task_config``, ``metrics``), so the demo streams what the model was
trained and tested on. The CO2 series ships inside the package (``service/data``), so the CO2
demo needs no download and no statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

CO2_DATA = "mauna_loa_co2_weekly.csv"
SEASON_WEEKS = 52
SEQUENCES_DEFAULT = 20
TIMER_STEPS_DEFAULT = 4000  # one lane of the timer's test stream


@dataclass(frozen=True)
class Measure:
    """One figure of a demo run beside the model's documented test-set figure."""

    name: str
    value: float  # the number, for tests and scripts
    shown: str  # the value as printed, with what it was measured over
    documented: str  # the test-set figure from model.json, or "not recorded"

    def line(self) -> str:
        return f"{self.name}: {self.shown} (test set: {self.documented})"


@dataclass(frozen=True)
class DemoScore:
    """What a demo run measured, a table of examples and the curves for ``--plot``."""

    measures: list[Measure]
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    x_label: str
    curves: dict[str, np.ndarray]
    markers: bool = False  # one point per sequence: draw markers, not lines

    def measure(self, name: str) -> float:
        """The value of the measure called ``name``."""
        return next(m.value for m in self.measures if m.name == name)


Scorer = Callable[[list[np.ndarray]], DemoScore]


@dataclass(frozen=True)
class DemoPlan:
    """The sequences to stream, each in its own session from zero state, and how to score them."""

    task: str
    description: str
    sequences: list[np.ndarray]  # [steps, features] float32 each
    score: Scorer
    notes: list[str] = field(default_factory=list)

    def summary(self, chunk_steps: int) -> str:
        """One line on what was streamed."""
        lengths = sorted({len(s) for s in self.sequences})
        span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        total = sum(len(s) for s in self.sequences)
        if len(self.sequences) == 1:
            return f"streamed {total} steps in one session, in chunks of {chunk_steps}"
        return (
            f"streamed {len(self.sequences)} sequences of {span} steps ({total} steps), "
            f"each in its own session, in chunks of {chunk_steps}"
        )


def config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The model's ``task_config`` (empty when model.json has none)."""
    value = metadata.get("task_config")
    return dict(value) if isinstance(value, Mapping) else {}


def test_metrics(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The model's documented test-set metrics (empty when model.json has none)."""
    metrics = metadata.get("metrics")
    test = metrics.get("test") if isinstance(metrics, Mapping) else None
    return dict(test) if isinstance(test, Mapping) else {}


def documented(test: Mapping[str, Any], key: str, fmt: str, unit: str = "") -> str:
    """``test[key]`` formatted, with the size of the test set when model.json records it."""
    if key not in test:
        return "not recorded"
    over = f" over {test['total']}" if "total" in test else ""
    return f"{format(float(test[key]), fmt)}{unit}{over}"


def lengths_for(
    steps: int | None, low: int, high: int, count: int, rng: np.random.Generator
) -> tuple[list[int], list[str]]:
    """Sequence lengths: ``steps`` for every one when given, else drawn from the trained range;
    a note when ``steps`` is outside it."""
    if steps is None:
        return [int(n) for n in rng.integers(low, high + 1, size=count)], []
    notes = []
    if not low <= steps <= high:
        notes.append(
            f"note: the model was trained and tested on {low}-{high} steps; at {steps} it is "
            "outside what it learned, so expect larger errors"
        )
    return [steps] * count, notes


def sequence_count(count: int | None) -> int:
    """``count`` sequences, or the default number."""
    return SEQUENCES_DEFAULT if count is None else count


def check_steps(task: str, steps: int | None, minimum: int, why: str) -> None:
    """A ValueError (exit 2) when ``steps`` is too short for the task's sequences."""
    if steps is not None and steps < minimum:
        raise ValueError(f"{task} sequences need at least {minimum} steps ({why}); got {steps}")


# --- adding problem -----------------------------------------------------------------------------


def adding_sequence(
    length: int, trained_length: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """One adding-problem sequence (1997 encoding, as training/tasks/adding.py) and its target."""
    values = rng.uniform(-1.0, 1.0, length).astype(np.float32)
    markers = np.zeros(length, np.float32)
    markers[0] = markers[-1] = -1.0
    first = int(rng.integers(0, 10))
    second_range = max(trained_length // 2 - 1, 2)
    second = first
    while second == first:
        second = int(rng.integers(0, second_range))
    markers[first] = markers[second] = 1.0
    if 0 in (first, second):
        values[0] = 0.0  # a marked first pair counts as zero, as in the paper
    target = float(np.float32(0.5 + (values[first] + values[second]) / 4.0))
    return np.stack([values, markers], 1), target


def adding_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """Sequences of the trained lengths; the measure is the MSE at the last step and the count
    of sequences off by the task's tolerance or more."""
    cfg = config(metadata)
    trained = int(cfg.get("length", 100))
    tolerance = float(cfg.get("tolerance", 0.04))
    second_range = max(trained // 2 - 1, 2)
    check_steps(
        "adding", steps, second_range + 1, f"the second marker stands in the first {second_range}"
    )
    high = int(cfg.get("max_length", trained))
    lengths, notes = lengths_for(steps, trained, high, sequence_count(count), rng)
    pairs = [adding_sequence(n, trained, rng) for n in lengths]
    targets = np.array([t for _, t in pairs])
    test = test_metrics(metadata)

    def score(outputs: list[np.ndarray]) -> DemoScore:
        predicted = np.array([float(y[-1, 0]) for y in outputs])
        error = predicted - targets
        mse = float(np.mean(error**2))
        wrong = int((np.abs(error) >= tolerance).sum())
        wrong_doc = f"{test['errors']} of {test['total']}" if "errors" in test else "not recorded"
        return DemoScore(
            measures=[
                Measure(
                    "MSE at the last step",
                    mse,
                    f"{mse:.2e} over {len(outputs)} sequences",
                    documented(test, "mse", ".2e"),
                ),
                Measure(
                    f"sequences wrong (|error| >= {tolerance:g})",
                    wrong,
                    f"{wrong} of {len(outputs)}",
                    wrong_doc,
                ),
            ],
            header=("sequence", "steps", "target", "prediction", "error"),
            rows=[
                (
                    str(i),
                    str(len(y)),
                    f"{targets[i]:.3f}",
                    f"{predicted[i]:.3f}",
                    f"{error[i]:+.4f}",
                )
                for i, y in enumerate(outputs)
            ],
            x_label="sequence",
            curves={"target": targets, "served prediction": predicted},
            markers=True,
        )

    return DemoPlan(
        "adding",
        "0.5 + (X1 + X2)/4 at the last step",
        [x for x, _ in pairs],
        score,
        notes,
    )


# --- temporal order -----------------------------------------------------------------------------


def temporal_order_sequence(length: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One temporal-order 6a sequence (as training/tasks/temporal_order.py) and its class."""
    symbols = rng.integers(2, 6, length)  # fillers a-d
    symbols[0], symbols[-1] = 0, 1  # E ... B
    first_is_y, second_is_y = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    symbols[int(rng.integers(10, 21)) - 1] = 6 + first_is_y  # X or Y at t1 in [10, 20]
    symbols[int(rng.integers(50, 61)) - 1] = 6 + second_is_y  # and at t2 in [50, 60]
    return np.eye(8, dtype=np.float32)[symbols], 2 * first_is_y + second_is_y


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits along the last axis."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))


def temporal_order_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """Sequences of the trained lengths; the measure is the accuracy of the argmax at the last
    step, and the task's own criterion (every probability within its tolerance)."""
    cfg = config(metadata)
    classes = [str(c) for c in cfg.get("classes", ("XX", "XY", "YX", "YY"))]
    tolerance = float(cfg.get("tolerance", 0.3))
    check_steps("temporal_order", steps, 61, "the second X/Y stands at step 50-60")
    low, high = int(cfg.get("min_length", 100)), int(cfg.get("max_length", 110))
    lengths, notes = lengths_for(steps, low, high, sequence_count(count), rng)
    pairs = [temporal_order_sequence(n, rng) for n in lengths]
    labels = np.array([c for _, c in pairs])
    logits = metadata.get("output_kind", "class_logits") == "class_logits"
    test = test_metrics(metadata)

    def score(outputs: list[np.ndarray]) -> DemoScore:
        last = np.stack([y[-1] for y in outputs])
        probs = softmax(last) if logits else last
        predicted = probs.argmax(axis=1)
        accuracy = float(np.mean(predicted == labels))
        deviation = np.abs(probs - np.eye(probs.shape[1])[labels]).max(axis=1)
        within = int((deviation < tolerance).sum())
        accuracy_doc, within_doc = "not recorded", "not recorded"
        if "errors" in test and "total" in test:
            total = int(test["total"])
            accuracy_doc = f"{1 - int(test['errors']) / total:.3f} over {total}"
            within_doc = f"{total - int(test['errors'])} of {total}"
        return DemoScore(
            measures=[
                Measure(
                    "accuracy (argmax at the last step)",
                    accuracy,
                    f"{accuracy:.3f} over {len(outputs)} sequences",
                    accuracy_doc,
                ),
                Measure(
                    f"every probability within {tolerance:g} of the one-hot class",
                    within,
                    f"{within} of {len(outputs)}",
                    within_doc,
                ),
            ],
            header=("sequence", "steps", "class", "predicted", "probabilities"),
            rows=[
                (
                    str(i),
                    str(len(y)),
                    classes[labels[i]],
                    classes[predicted[i]],
                    np.array2string(probs[i], precision=3, suppress_small=True),
                )
                for i, y in enumerate(outputs)
            ],
            x_label="sequence",
            curves={"class": labels.astype(float), "predicted class": predicted.astype(float)},
            markers=True,
        )

    return DemoPlan(
        "temporal_order",
        "the order of X/Y at steps 10-20 and 50-60 (XX, XY, YX, YY), at the last step",
        [x for x, _ in pairs],
        score,
        notes,
    )


# --- Jaeger's timer -----------------------------------------------------------------------------


def timer_stream(
    steps: int, scale: int, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Gap, trigger, pulse, ... (as training/tasks/timer.py): inputs [steps, 2], targets [steps]."""
    x = np.zeros((steps, 2), np.float32)
    y = np.zeros(steps, np.float32)
    min_gap = max(2, scale // 10)
    max_gap = max(min_gap + 1, (6 * scale) // 10)
    t = 0
    while True:
        t += int(rng.integers(min_gap, max_gap + 1))
        if t >= steps:
            return x, y
        code = round(int(rng.integers(1, 11)) / 10.0, 1)
        duration = round(code * scale)
        x[t] = (1.0, code)
        y[t : t + duration] = level
        t += duration


@dataclass(frozen=True)
class Pulse:
    """One pulse of the timer stream as the served output drew it."""

    trigger_step: int
    duration_steps: int
    onset_steps: int | None  # steps from the trigger to the output crossing the threshold
    length_steps: int | None  # steps the output stayed above it
    correct: bool


def judge_pulses(
    x: np.ndarray, prediction: np.ndarray, scale: int, threshold: float
) -> list[Pulse]:
    """The timer's criterion per pulse: the output crosses ``threshold`` at the trigger and falls
    below it at the pulse's end, each within max(1, 5% of the duration) steps, and stays below
    until the next trigger. Pulses cut off by the end of the stream are not judged."""
    triggers = np.flatnonzero(x[:, 0] > 0.5)
    above = prediction > threshold
    pulses = []
    for i, start in enumerate(triggers):
        duration = round(float(x[start, 1]) * scale)
        window_end = int(triggers[i + 1]) if i + 1 < len(triggers) else len(prediction)
        if start + duration >= window_end:
            continue
        tolerance = max(1, round(0.05 * duration))
        segment = above[start:window_end]
        on = np.flatnonzero(segment)
        if len(on) == 0:
            pulses.append(Pulse(int(start), duration, None, None, False))
            continue
        onset = int(on[0])
        off = np.flatnonzero(~segment[onset:])
        offset = onset + int(off[0]) if len(off) else len(segment)
        correct = (
            onset <= tolerance
            and abs(offset - duration) <= tolerance
            and not segment[offset:].any()
        )
        pulses.append(Pulse(int(start), duration, onset, offset - onset, bool(correct)))
    return pulses


def pulse_row(pulse: Pulse) -> tuple[str, ...]:
    """A row of the timer's table: the pulse and where the served output drew it."""
    if pulse.onset_steps is None:
        drawn = "never"
    else:
        first = pulse.trigger_step + pulse.onset_steps
        drawn = f"steps {first}-{first + (pulse.length_steps or 0) - 1}"
    return (
        str(pulse.trigger_step),
        str(pulse.duration_steps),
        drawn,
        "yes" if pulse.correct else "NO",
    )


def stream_mse_documented(test: Mapping[str, Any]) -> str:
    """The timer's documented stream MSE and the steps of its test stream."""
    if "mse" not in test:
        return "not recorded"
    over = f" over {int(test['steps'])} steps" if "steps" in test else ""
    return f"{float(test['mse']):.2e}{over}"


def timer_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """One stream of ``steps`` (default one test lane, 4000); the measures are the fraction of
    pulses the timer's criterion accepts and the stream MSE."""
    if count is not None:
        raise ValueError(
            "the timer is one endless stream: --sequences does not apply (use --steps)"
        )
    cfg = config(metadata)
    scale = int(cfg.get("scale", 100))
    level = float(cfg.get("level", 0.5))
    threshold = float(cfg.get("threshold", 0.25))
    x, y = timer_stream(steps or TIMER_STEPS_DEFAULT, scale, level, rng)
    test = test_metrics(metadata)

    def score(outputs: list[np.ndarray]) -> DemoScore:
        prediction = outputs[0][:, 0]
        pulses = judge_pulses(x, prediction, scale, threshold)
        correct = sum(p.correct for p in pulses)
        accuracy = correct / len(pulses) if pulses else math.nan
        mse = float(np.mean((prediction - y) ** 2))
        pulse_doc = "not recorded"
        if "pulse_accuracy" in test and "errors" in test and "total" in test:
            total = int(test["total"])
            pulse_doc = (
                f"{float(test['pulse_accuracy']):.3f}, {total - int(test['errors'])} of {total}"
            )
        return DemoScore(
            measures=[
                Measure(
                    "pulses correct",
                    accuracy,
                    f"{accuracy:.3f}, {correct} of {len(pulses)} pulses",
                    pulse_doc,
                ),
                Measure(
                    "stream MSE",
                    mse,
                    f"{mse:.2e} over {len(y)} steps",
                    stream_mse_documented(test),
                ),
            ],
            header=("trigger step", "duration", f"output above {threshold:g}", "correct"),
            rows=[pulse_row(p) for p in pulses],
            x_label="step",
            curves={"target": y, "served prediction": prediction, "trigger (u1)": x[:, 0]},
        )

    return DemoPlan(
        "timer",
        f"output {level:g} for {scale}*u2 steps after each trigger, over one stream never reset",
        [x],
        score,
        [
            f"criterion per pulse: onset and end within max(1, 5% of the duration) steps, "
            f"threshold {threshold:g}"
        ],
    )


# --- Mauna Loa CO2 ------------------------------------------------------------------------------


def co2_weeks() -> tuple[list[str], np.ndarray]:
    """The weekly Mauna Loa series shipped with the package: week labels and readings in ppm,
    the weeks without a reading filled by linear interpolation (as training/tasks/co2.py)."""
    text = resources.files("service").joinpath("data", CO2_DATA).read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    rows = [line.split(",") for line in lines[1:]]  # after the header: week,co2_ppm
    weeks = [week for week, _ in rows]
    ppm = np.array([float(v) if v else np.nan for _, v in rows], np.float64)
    known = ~np.isnan(ppm)
    index = np.arange(len(ppm))
    return weeks, np.interp(index, index[known], ppm[known])


def co2_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """The whole weekly series in one session from zero state, as the model was tested; the
    measure is the RMSE of the one-week-ahead forecast over the test weeks, beside the baselines."""
    del rng  # the series is fixed
    weeks, ppm = co2_weeks()
    cfg = config(metadata)
    if steps is not None or count is not None:
        raise ValueError(
            f"the co2 demo streams the whole weekly series ({len(ppm) - 2} steps) in one session: "
            "--steps and --sequences do not apply"
        )
    if int(cfg.get("weeks", len(ppm))) != len(ppm):
        raise ValueError(
            f"the model was trained on {cfg['weeks']} weeks of CO2, the demo series has {len(ppm)}"
        )
    change = np.diff(ppm)
    split = int(cfg.get("train_weeks", int(len(ppm) * 0.8)))
    scale_ppm = float(cfg.get("scale_ppm", change[: split - 1].std()))
    inputs = (change / scale_ppm).astype(np.float32)[:-1, None]  # the change into week i+1
    test_weeks = np.arange(split, len(ppm))
    test = test_metrics(metadata)

    def rmse(forecast: np.ndarray) -> float:
        return float(np.sqrt(np.mean((ppm[test_weeks] - forecast) ** 2)))

    def score(outputs: list[np.ndarray]) -> DemoScore:
        forecast_all = ppm[1:-1] + outputs[0][:, 0].astype(np.float64) * scale_ppm  # of week i+2
        forecast = forecast_all[test_weeks - 2]
        model_rmse = rmse(forecast)
        naive, last = rmse(ppm[test_weeks - SEASON_WEEKS]), rmse(ppm[test_weeks - 1])
        shown = np.linspace(0, len(test_weeks) - 1, 60).astype(int)
        return DemoScore(
            measures=[
                Measure(
                    "one-week-ahead forecast RMSE",
                    model_rmse,
                    f"{model_rmse:.3f} ppm over the {len(test_weeks)} test weeks",
                    documented(test, "rmse_ppm", ".3f", " ppm"),
                ),
                Measure(
                    "seasonal-naive RMSE (the reading 52 weeks before)",
                    naive,
                    f"{naive:.3f} ppm",
                    documented(test, "seasonal_naive_rmse_ppm", ".3f", " ppm"),
                ),
                Measure(
                    "persistence RMSE (the last reading)",
                    last,
                    f"{last:.3f} ppm",
                    documented(test, "persistence_rmse_ppm", ".3f", " ppm"),
                ),
            ],
            header=("week", "reading (ppm)", "forecast (ppm)", "error (ppm)"),
            rows=[
                (weeks[w], f"{ppm[w]:.2f}", f"{forecast[i]:.2f}", f"{forecast[i] - ppm[w]:+.2f}")
                for i, w in ((int(i), int(test_weeks[i])) for i in shown)
            ],
            x_label=f"test week (from {weeks[split]})",
            curves={"reading (ppm)": ppm[test_weeks], "served forecast (ppm)": forecast},
        )

    return DemoPlan(
        "co2",
        "weekly Mauna Loa CO2 (1958-2001), the next week's reading forecast from the weekly changes",
        [inputs],
        score,
        [
            f"the first {split} weeks trained the model; the last {len(test_weeks)} are its test weeks"
        ],
    )


PlanMaker = Callable[[Mapping[str, Any], int | None, int | None, np.random.Generator], DemoPlan]
PLANS: dict[str, PlanMaker] = {
    "timer": timer_plan,
    "adding": adding_plan,
    "temporal_order": temporal_order_plan,
    "co2": co2_plan,
}


def plan_for(
    task: str,
    metadata: Mapping[str, Any],
    *,
    steps: int | None = None,
    sequences: int | None = None,
    seed: int = 0,
) -> DemoPlan:
    """The demo of ``task`` for a model with ``metadata`` (its model.json). ``steps``: the length
    of every sequence (default: the lengths the model was trained on); ``sequences``: how many
    (per-sequence tasks; default 20). Raises ValueError for a task without a demo or a setting
    that does not apply."""
    try:
        make = PLANS[task]
    except KeyError:
        raise ValueError(f"no demo for task {task!r}; demos exist for {', '.join(PLANS)}") from None
    return make(metadata, steps, sequences, np.random.default_rng(seed))
