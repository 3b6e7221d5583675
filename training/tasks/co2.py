"""Weekly Mauna Loa CO2 (1958-2001), streamed one step ahead.

The series ships inside the statsmodels wheel (``statsmodels.datasets.co2``); its 59 missing weeks
are filled by linear interpolation. The model reads the scaled weekly change ``(v[t] - v[t-1]) / s``
and predicts the next one, so the forecast of the next reading is ``v[t] + s * y[t]``; ``s`` (ppm) is
recorded in the model metadata. The first 80% of the weeks train, the last 20% test. The model runs
over the whole series from zero state, never reset, as the service streams it.

Baselines on the same test weeks: seasonal naive (the reading 52 weeks earlier) and persistence
(the last reading). The task counts as solved when the model beats the seasonal-naive RMSE.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from training.tasks.base import Batch, Evaluation, Task, to_tensor

SEASON_WEEKS = 52
TRAIN_FRACTION = 0.8


@cache
def load_co2_ppm() -> np.ndarray:
    """Weekly CO2 readings in ppm with gaps interpolated (float64, 2284 weeks)."""
    from statsmodels.datasets import co2

    frame = co2.load_pandas().data
    return np.asarray(frame["co2"].interpolate(method="linear").to_numpy(), dtype=np.float64)


class CO2Task(Task):
    name = "co2"
    input_size = 1
    output_size = 1
    output_kind = "regression"
    description = "Weekly Mauna Loa CO2, one-step-ahead forecast of the weekly change, streamed."
    criterion = "test RMSE (ppm) below the seasonal-naive baseline's"

    def __init__(self, window_weeks: int = 312, warmup_weeks: int = SEASON_WEEKS) -> None:
        self.window_weeks = window_weeks
        self.warmup_weeks = warmup_weeks
        self.readings_ppm = load_co2_ppm()
        self.split = int(len(self.readings_ppm) * TRAIN_FRACTION)
        change = np.diff(self.readings_ppm)  # change[i] = v[i+1] - v[i]
        self.scale_ppm = float(change[: self.split - 1].std())
        self.inputs = (change / self.scale_ppm).astype(
            np.float32
        )  # x[i] is the change into week i+1

    def config(self) -> dict[str, Any]:
        return {
            "scale_ppm": self.scale_ppm,
            "weeks": len(self.readings_ppm),
            "train_weeks": self.split,
            "window_weeks": self.window_weeks,
            "input": "weekly change in ppm divided by scale_ppm",
            "output": "next weekly change in ppm divided by scale_ppm",
        }

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        # x[i] -> target x[i+1]; the last target used must be a training week: i + 2 <= split - 1.
        last_start = self.split - 2 - self.window_weeks
        starts = rng.integers(0, last_start + 1, size=batch_size)
        idx = starts[:, None] + np.arange(self.window_weeks)[None, :]
        x = self.inputs[idx][..., None]
        y = self.inputs[idx + 1][..., None]
        mask = np.zeros((batch_size, self.window_weeks), dtype=np.float32)
        mask[:, self.warmup_weeks :] = 1.0
        return Batch(x=to_tensor(x), y=to_tensor(y), mask=to_tensor(mask))

    def forecast_ppm(self, model: nn.Module) -> np.ndarray:
        """Model forecasts of v[t] for t = 2 .. n-1, streaming the whole series from zero state."""
        with torch.no_grad():
            y, _ = model(to_tensor(self.inputs[None, :-1, None]))
        predicted_change = y[0, :, 0].numpy().astype(np.float64) * self.scale_ppm
        return self.readings_ppm[1:-1] + predicted_change  # forecast of v[i+2] made at week i+1

    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        del seed  # the test weeks are fixed: the last 20% of the series
        v = self.readings_ppm
        weeks = np.arange(self.split, len(v))
        model_forecast = self.forecast_ppm(model)[weeks - 2]
        seasonal_naive = v[weeks - SEASON_WEEKS]
        persistence = v[weeks - 1]

        def rmse(forecast: np.ndarray) -> float:
            return float(np.sqrt(np.mean((v[weeks] - forecast) ** 2)))

        model_rmse = rmse(model_forecast)
        naive_rmse = rmse(seasonal_naive)
        return Evaluation(
            solved=model_rmse < naive_rmse,
            errors=0,
            total=len(weeks),
            mse=model_rmse**2,
            metrics={
                "rmse_ppm": model_rmse,
                "seasonal_naive_rmse_ppm": naive_rmse,
                "persistence_rmse_ppm": rmse(persistence),
            },
        )
