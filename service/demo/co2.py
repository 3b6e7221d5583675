"""Mauna Loa CO2: a one-week-ahead forecast: the demo of ``rnnserve stream`` (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np

from service.demo.base import (
    DemoPlan,
    DemoScore,
    Measure,
    config,
    documented,
    test_metrics,
)
from service.errors import UsageError

CO2_DATA = "mauna_loa_co2_weekly.csv"  # in service/data: the weekly series, gaps empty
SEASON_WEEKS = 52


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
        raise UsageError(
            f"the co2 demo streams the whole weekly series ({len(ppm) - 2} steps) in one session: "
            "--steps and --sequences do not apply"
        )
    if int(cfg.get("weeks", len(ppm))) != len(ppm):
        raise UsageError(
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
