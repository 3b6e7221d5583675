"""Temporal order: the demo of ``rnnserve stream`` (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.demo.base import (
    DemoPlan,
    DemoScore,
    Measure,
    check_steps,
    config,
    lengths_for,
    sequence_count,
    test_metrics,
)


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
