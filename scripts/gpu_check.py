"""Exactness and speed of the serving core on a GPU, with the state on the device or the host.

    python scripts/gpu_check.py                      # every GPU provider onnxruntime offers, + CPU
    python scripts/gpu_check.py --providers cpu --quick   # the smoke test the suite runs

Needs onnxruntime-gpu (and CUDA) for ``cuda``/``tensorrt``, and the ``onnx`` package to build the
synthetic model (a 2-layer LSTM, hidden 512, random weights; no torch). For each provider, model
and state residency it:

1. checks exactness: sessions with mixed chunk lengths go through the same gather -> compute ->
   scatter path as the server's batcher (service.session_store, service.batch_compute, batch
   buckets as the server would pad on that provider), and every session's outputs must equal the
   same session run alone in one call, to float32 rounding;
2. measures throughput and latency: at each session count, every session sends one step per
   round, in batches of up to --max-batch-size; steps/s over all rounds, and p50/p99 of one batch's
   time (gather + model call + scatter).

Exits 1 if any exactness check fails. Prints a Markdown table (docs/PERFORMANCE.md has one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.batch_compute import compute_batch
from service.model_check import open_model
from service.repository import ModelSpec
from service.runtime import ModelRuntime
from service.session_store import SessionStore
from service.settings import BUNDLED_MODELS, Settings

PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
SYNTHETIC = "synthetic_lstm512"
EXACT_ATOL = 1e-5  # float32 rounding over a few dozen steps (the tests use the same bound)
CPU_ATOL = 1e-4  # against the CPU provider: other kernels, still float32 (TF32 would be ~1e-3)


@dataclass
class Loaded:
    provider: str
    spec: ModelSpec
    runtime: ModelRuntime
    buckets: tuple[int, ...]


def build_synthetic_lstm(
    folder: Path, hidden: int = 512, layers: int = 2, inputs: int = 32
) -> Path:
    """A batch-major LSTM by the ONNX contract (x, h0, c0 -> y, hn, cn) with a linear head,
    seeded random weights, made with the onnx package's helpers: the ONNX LSTM op per layer."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise SystemExit("the synthetic model needs the onnx package: pip install onnx") from None
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(hidden)

    def weight(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(
            rng.uniform(-scale, scale, shape).astype(np.float32), name=name
        )

    def ints(name: str, values: list[int]) -> Any:
        return numpy_helper.from_array(np.array(values, np.int64), name=name)

    nodes = [helper.make_node("Transpose", ["x"], ["x_tm"], perm=[1, 0, 2])]  # to time-major
    inits = [ints("axis0", [0]), ints("axis1", [1])]
    layer_in, width = "x_tm", inputs
    h_outs, c_outs = [], []
    for k in range(layers):
        inits += [weight(f"W{k}", 1, 4 * hidden, width), weight(f"R{k}", 1, 4 * hidden, hidden),
                  weight(f"B{k}", 1, 8 * hidden), ints(f"start{k}", [k]), ints(f"end{k}", [k + 1])]  # fmt: skip
        nodes += [
            helper.make_node("Slice", ["h0", f"start{k}", f"end{k}", "axis0"], [f"h0_{k}"]),
            helper.make_node("Slice", ["c0", f"start{k}", f"end{k}", "axis0"], [f"c0_{k}"]),
            helper.make_node(
                "LSTM",
                [layer_in, f"W{k}", f"R{k}", f"B{k}", "", f"h0_{k}", f"c0_{k}"],
                [f"Y{k}", f"hn_{k}", f"cn_{k}"],
                hidden_size=hidden,
            ),
            helper.make_node("Squeeze", [f"Y{k}", "axis1"], [f"out{k}"]),  # [T, B, H]
        ]
        layer_in, width = f"out{k}", hidden
        h_outs.append(f"hn_{k}")
        c_outs.append(f"cn_{k}")
    inits += [weight("head_w", hidden, 1), weight("head_b", 1)]
    nodes += [
        helper.make_node("Concat", h_outs, ["hn"], axis=0),
        helper.make_node("Concat", c_outs, ["cn"], axis=0),
        helper.make_node("Transpose", [layer_in], ["out_bm"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["out_bm", "head_w"], ["y_raw"]),
        helper.make_node("Add", ["y_raw", "head_b"], ["y"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, SYNTHETIC,
        [helper.make_tensor_value_info("x", f32, ["batch", "time", inputs]),
         helper.make_tensor_value_info("h0", f32, [layers, "batch", hidden]),
         helper.make_tensor_value_info("c0", f32, [layers, "batch", hidden])],
        [helper.make_tensor_value_info("y", f32, ["batch", "time", 1]),
         helper.make_tensor_value_info("hn", f32, [layers, "batch", hidden]),
         helper.make_tensor_value_info("cn", f32, [layers, "batch", hidden])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    version = folder / SYNTHETIC / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.onnx").write_bytes(model.SerializeToString())
    meta = {"name": SYNTHETIC, "version": "1", "cell": "lstm", "num_layers": layers,
            "hidden_size": hidden, "input_size": inputs, "output_size": 1,
            "task": "synthetic", "output_kind": "regression",
            "description": "2-layer LSTM, hidden 512, random weights (scripts/gpu_check.py)"}  # fmt: skip
    (version / "model.json").write_text(json.dumps(meta, indent=2))
    return version


def load(directory: Path, provider: str, max_batch_size: int) -> Loaded:
    settings = Settings(
        execution_provider=provider,  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        inline_compute_below_s=0.0,
    )
    spec, runtime = open_model(directory, settings)  # the server's load-time checks included
    buckets = settings.resolved_batch_buckets(on_gpu=runtime.device.kind == "cuda")
    return Loaded(provider, spec, runtime, buckets)


def new_store(model: Loaded, residency: str, sessions: int) -> tuple[SessionStore, np.ndarray]:
    """A store of ``sessions`` new sessions, and their slots."""
    spec = model.spec
    store = SessionStore(
        state_count=len(spec.state_inputs), layers=spec.num_layers, hidden=spec.hidden_size,
        max_sessions=max(sessions, 1), residency=residency,  # type: ignore[arg-type]
        device=model.runtime.device,
    )  # fmt: skip
    slots = np.array([store.create().slot for _ in range(sessions)], np.intp)
    return store, slots


def call_for(model: Loaded, residency: str) -> Callable[..., Any]:
    return model.runtime.run_bound if residency == "device" else model.runtime.run


def step_batch(
    model: Loaded, residency: str, store: SessionStore, slots: np.ndarray, inputs: list[np.ndarray]
) -> list[np.ndarray]:
    """One batch as the batcher runs it: gather, compute, scatter."""
    outcome = compute_batch(
        call_for(model, residency), model.spec.label, inputs, store.gather(slots),
        store.bank.rows, model.buckets,
    )  # fmt: skip
    if outcome.error is not None or not all(outcome.finished):
        raise RuntimeError(f"batch failed: {outcome.error}")
    store.scatter(slots, outcome.states)
    return outcome.outputs


def check_exactness(
    model: Loaded, cpu: ModelRuntime, residency: str, sessions: int, seed: int = 0
) -> tuple[float, float]:
    """Largest differences between a session streamed in mixed chunks among others and the same
    session run alone in one call, on the same provider and on the CPU provider (``cpu``).
    Sessions join and leave batches as their chunks run out."""
    rng = np.random.default_rng(seed)
    features = model.spec.input_size
    xs = [rng.standard_normal((int(rng.integers(12, 40)), features)).astype(np.float32)
          for _ in range(sessions)]  # fmt: skip
    store, slot_of = new_store(model, residency, sessions)
    done = [0] * sessions
    outputs: list[list[np.ndarray]] = [[] for _ in range(sessions)]
    while any(d < len(x) for d, x in zip(done, xs, strict=True)):
        batch = [i for i in range(sessions) if done[i] < len(xs[i]) and rng.random() < 0.8]
        if not batch:
            continue
        chunks = []
        for i in batch:
            steps = min(int(rng.integers(1, 9)), len(xs[i]) - done[i])
            chunks.append(xs[i][done[i] : done[i] + steps])
            done[i] += steps
        slots = slot_of[batch]
        for i, y in zip(batch, step_batch(model, residency, store, slots, chunks), strict=True):
            outputs[i].append(y)
    worst, worst_cpu = 0.0, 0.0
    for i, x in enumerate(xs):
        initial = [np.zeros((s.pre, 1, s.post), np.float32) for s in model.spec.tensors.states]
        streamed = np.concatenate(outputs[i])
        alone, _ = model.runtime.run(x[None], initial)
        offline, _ = cpu.run(x[None], initial)
        worst = max(worst, float(np.abs(streamed - alone[0]).max()))
        worst_cpu = max(worst_cpu, float(np.abs(streamed - offline[0]).max()))
    return worst, worst_cpu


def measure(
    model: Loaded, residency: str, sessions: int, rounds: int, max_batch: int
) -> dict[str, float]:
    """steps/s and batch latency percentiles with ``sessions`` each stepping once per round."""
    store, slot_of = new_store(model, residency, sessions)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sessions, 1, model.spec.input_size)).astype(np.float32)
    batches = [np.arange(a, min(a + max_batch, sessions)) for a in range(0, sessions, max_batch)]
    for rows in batches:  # warm-up: first calls of each shape build kernels and engines
        step_batch(model, residency, store, slot_of[rows], list(x[rows]))
    times = []
    started = time.perf_counter()
    for _ in range(rounds):
        for rows in batches:
            t0 = time.perf_counter()
            step_batch(model, residency, store, slot_of[rows], list(x[rows]))
            times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    return {
        "steps_per_s": sessions * rounds / total,
        "p50_ms": float(np.percentile(times, 50)) * 1e3,
        "p99_ms": float(np.percentile(times, 99)) * 1e3,
    }


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi"
    result = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 else "unknown GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", "--provider", nargs="+", choices=["cpu", "cuda", "tensorrt"],
                        help="default: cpu and every GPU provider onnxruntime offers")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=["adding_lstm", SYNTHETIC],
                        help=f"bundled model names, and/or {SYNTHETIC}")  # fmt: skip
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=50, help="steps per session per point")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--exact-sessions", type=int, default=200)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: sessions 1 and 8, 3 rounds, 16 exactness sessions")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.rounds, args.exact_sessions = [1, 8], 3, 16
    available = ort.get_available_providers()
    providers = args.providers or ["cpu"] + [
        p for p, name in PROVIDER_NAMES.items() if name in available
    ]
    missing = [p for p in providers if p != "cpu" and PROVIDER_NAMES[p] not in available]
    if missing:
        print(f"onnxruntime {ort.__version__} offers {', '.join(available)}: no {', '.join(missing)}"
              " (install onnxruntime-gpu with CUDA)", file=sys.stderr)  # fmt: skip
        return 2
    print(f"onnxruntime {ort.__version__}; providers {', '.join(available)}; GPU: {gpu_name()}; "
          f"NVIDIA_TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE', 'unset (set at load)')}")  # fmt: skip
    failures = 0
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        directories = {
            name: (build_synthetic_lstm(Path(temp)) if name == SYNTHETIC
                   else BUNDLED_MODELS / name / "1")
            for name in args.models
        }  # fmt: skip
        cpu = {name: load(d, "cpu", args.max_batch_size).runtime for name, d in directories.items()}
        for provider in providers:
            for name, directory in directories.items():
                model = load(directory, provider, args.max_batch_size)
                for residency in ("host", "device"):
                    worst, worst_cpu = check_exactness(model, cpu[name], residency,
                                                       args.exact_sessions)  # fmt: skip
                    exact = worst <= EXACT_ATOL and worst_cpu <= CPU_ATOL
                    failures += not exact
                    print(f"exactness {provider:8} {name:18} {residency:6} "
                          f"{args.exact_sessions} sessions: max diff {worst:.2e} "
                          f"(vs cpu {worst_cpu:.2e}) {'ok' if exact else 'FAILED'}",
                          flush=True)  # fmt: skip
                    for sessions in args.sessions:
                        point = measure(model, residency, sessions, args.rounds,
                                        args.max_batch_size)  # fmt: skip
                        rows.append((provider, name, residency, sessions, point))
    print()
    print("| provider | model | state | sessions | steps/s | batch p50 ms | batch p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|")
    for provider, name, residency, sessions, point in rows:
        print(f"| {provider} | {name} | {residency} | {sessions} | {point['steps_per_s']:,.0f} | "
              f"{point['p50_ms']:.3f} | {point['p99_ms']:.3f} |")  # fmt: skip
    if failures:
        print(f"\n{failures} exactness check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
