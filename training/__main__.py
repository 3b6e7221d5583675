"""Command line: ``python -m training {train,experiments,bundle,export,export-module,verify,synthetic,report}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.models import CELLS

DEFAULT_RUNS = Path("runs")
DEFAULT_REPOSITORY = Path("models")
DEFAULT_DOCS = Path("docs")


def build_parser() -> argparse.ArgumentParser:
    from training.tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train RNN/LSTM/GRU models on long-time-lag tasks and export them to ONNX.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train one model on one task")
    p.add_argument("--task", choices=sorted(TASKS), required=True, help="which problem to learn")
    p.add_argument("--cell", choices=CELLS, required=True, help="recurrent cell type")
    p.add_argument("--hidden-size", type=int, default=32, help="units per layer (default 32)")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers (default 1)")
    p.add_argument(
        "--init",
        choices=("keep", "default"),
        default="keep",
        help="'keep': LSTM forget / GRU update gate bias +5 (default); 'default': PyTorch's init",
    )
    p.add_argument(
        "--no-forget-gate",
        action="store_true",
        help="LSTM only: pin the forget gate at 1 (1997 LSTM)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="sequences (or stream lanes) per step"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--max-steps", type=int, default=20_000, help="optimizer steps at most")
    p.add_argument("--max-seconds", type=float, default=290.0, help="wall-time budget in seconds")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    p.add_argument(
        "--no-early-stop", action="store_true", help="train the full budget even if solved"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    p.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<task>-<cell>)"
    )
    p.add_argument(
        "--export-as", default=None, help="also export to the model repository under this name"
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")

    p = commands.add_parser("experiments", help="run the recipes behind the results table")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where run directories go")
    p.add_argument("--only", nargs="*", default=None, help="run names (e.g. adding-lstm) to run")
    p.add_argument(
        "--skip-done", action="store_true", help="skip runs that already have results.json"
    )

    p = commands.add_parser("bundle", help="train (if needed) and export the bundled models")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where run directories go")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
    p.add_argument("--retrain", action="store_true", help="train again even if a run exists")

    p = commands.add_parser("export", help="export a run's checkpoint to ONNX and verify it")
    p.add_argument("run_dir", type=Path, help="run directory with checkpoint.pt and results.json")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", default="1", help="model version (default 1)")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")

    p = commands.add_parser(
        "export-module",
        help="export your own PyTorch model to ONNX, verified against torch",
        description="Export a model of your own by the service's contract. FACTORY returns "
        "either a recurrent layer with what surrounds it: the rnn alone, (rnn, head), "
        "(embedding, rnn, head) or a dict with keys rnn, head, embedding (nn.LSTM, nn.GRU or "
        "nn.RNN, any layers, batch_first either way, an LSTM's proj_size too; an nn.Embedding "
        "of int64 token ids before it; a head applied to each step's output), or any module "
        "with forward(*inputs, *states) -> (*outputs, *new_states), batch-major, as a dict with "
        "keys module, inputs, outputs, states (training.export_any.export_module). The graph "
        "is verified against torch over a whole sequence and in chunks of 1, 3 and 7 steps "
        "before anything is written. Then run: rnnserve check REPOSITORY.",
    )
    p.add_argument(
        "--factory",
        required=True,
        help="package.module:function returning the modules (see above); the current folder is "
        "importable",
    )
    p.add_argument(
        "--state-dict",
        type=Path,
        default=None,
        help="weights to load first: a torch.save'd state dict, with keys rnn.*, head.* and "
        "embedding.* for a recurrent layer, the module's own keys for a module",
    )
    p.add_argument("--repository", type=Path, required=True, help="model repository to write to")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", default="1", help="model version (default 1)")
    p.add_argument("--description", default="", help="one line for model.json")

    p = commands.add_parser("verify", help="re-judge exported models on fresh held-out data")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
    p.add_argument("--seed", type=int, default=7, help="seed of the fresh held-out data")

    p = commands.add_parser(
        "synthetic", help="export a random-weight model of any size (for benchmarks)"
    )
    p.add_argument("--name", default="synthetic_lstm512", help="model name in the repository")
    p.add_argument("--cell", choices=("rnn", "lstm", "gru"), default="lstm", help="cell type")
    p.add_argument("--inputs", type=int, default=32, help="input features per step")
    p.add_argument("--hidden-size", type=int, default=512, help="hidden units per layer")
    p.add_argument("--layers", type=int, default=2, help="stacked recurrent layers")
    p.add_argument("--outputs", type=int, default=1, help="output features per step")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--repository", type=Path, required=True, help="model repository to write to")

    p = commands.add_parser("report", help="write the results table and plots")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run directories to read")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="where results.md and plots go")
    return parser


def command_train(args: argparse.Namespace) -> int:
    from training.pipeline import export_run, run_experiment
    from training.recipes import Experiment

    experiment = Experiment(
        task=args.task,
        cell=args.cell,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        init=args.init,
        forget_gate=not args.no_forget_gate,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        max_seconds=args.max_seconds,
        eval_every=args.eval_every,
        early_stop=not args.no_early_stop,
        seed=args.seed,
    )
    out = args.out or DEFAULT_RUNS / experiment.run_name
    _, result = run_experiment(experiment, out)
    print(json.dumps({"run": str(out), "solved": result.solved, "test": result.test}, indent=2))
    if args.export_as:
        metadata = export_run(out, args.repository, args.export_as)
        print(f"exported {args.repository / args.export_as / metadata['version']}")
    return 0


def command_experiments(args: argparse.Namespace) -> int:
    from training.pipeline import run_experiment
    from training.recipes import EXPERIMENTS

    chosen = [e for e in EXPERIMENTS if args.only is None or e.run_name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(e.run_name for e in EXPERIMENTS)
        print(f"unknown run name in {args.only}; known: {known}", file=sys.stderr)
        return 2
    for experiment in chosen:
        if args.skip_done and (args.runs / experiment.run_name / "results.json").exists():
            continue
        run_experiment(experiment, args.runs / experiment.run_name)
    return 0


def command_bundle(args: argparse.Namespace) -> int:
    from training.pipeline import export_run, run_experiment
    from training.recipes import EXPERIMENTS

    for experiment in EXPERIMENTS:
        if experiment.bundle_as is None:
            continue
        run_dir = args.runs / experiment.run_name
        if args.retrain or not (run_dir / "results.json").exists():
            run_experiment(experiment, run_dir)
        metadata = export_run(run_dir, args.repository, experiment.bundle_as)
        print(
            f"{experiment.bundle_as}: solved={metadata['metrics']['solved']} sha256={metadata['sha256'][:12]}"
        )
    return 0


def command_export(args: argparse.Namespace) -> int:
    from training.pipeline import export_run

    metadata = export_run(args.run_dir, args.repository, args.name, args.version)
    print(json.dumps(metadata["verification"], indent=2))
    return 0


def command_export_module(args: argparse.Namespace) -> int:
    from training.export import ExportVerificationError, UnsupportedModuleError
    from training.export_command import (
        FactoryError,
        export_parts,
        load_factory,
        load_weights,
        summary,
    )

    origin = {"factory": args.factory}
    if args.state_dict is not None:
        origin["state_dict"] = str(args.state_dict)
    try:
        parts = load_factory(args.factory)
        if args.state_dict is not None:
            load_weights(parts, args.state_dict)
        metadata = export_parts(
            parts,
            repository=args.repository,
            name=args.name,
            version=args.version,
            metadata={"description": args.description},
            origin=origin,
        )
    except (FactoryError, UnsupportedModuleError, ExportVerificationError) as error:
        print(f"python -m training export-module: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.repository / args.name / args.version}: {summary(metadata)}")
    print(f"next: rnnserve check {args.repository}")
    return 0


def command_verify(args: argparse.Namespace) -> int:
    from training.pipeline import check_bundled_model
    from training.tasks import TASKS

    failures = 0
    for model_json in sorted(args.repository.glob("*/*/model.json")):
        if json.loads(model_json.read_text()).get("task") not in TASKS:
            print(f"{model_json.parent.parent.name}/{model_json.parent.name}: skipped (no task)")
            continue
        evaluation, metadata = check_bundled_model(model_json.parent, args.seed)
        status = "ok" if evaluation.solved else "FAILED"
        failures += not evaluation.solved
        print(
            f"{metadata['name']}/{metadata['version']}: {status} errors {evaluation.errors}/{evaluation.total} mse {evaluation.mse:.3g}"
        )
    return 1 if failures else 0


def command_synthetic(args: argparse.Namespace) -> int:
    from training.synthetic import export_random_model

    metadata = export_random_model(
        args.repository,
        args.name,
        cell=args.cell,
        input_size=args.inputs,
        hidden_size=args.hidden_size,
        output_size=args.outputs,
        num_layers=args.layers,
        seed=args.seed,
    )
    print(f"exported {args.repository / args.name / metadata['version']}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from training.report import write_report

    written = write_report(args.runs, args.docs)
    for path in written:
        print(path)
    return 0


COMMANDS = {
    "train": command_train,
    "experiments": command_experiments,
    "bundle": command_bundle,
    "export": command_export,
    "export-module": command_export_module,
    "verify": command_verify,
    "synthetic": command_synthetic,
    "report": command_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
