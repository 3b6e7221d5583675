"""The model repository: ``<root>/<name>/<version>/model.onnx`` + ``model.json``.

Every model is checked against the ONNX contract at load, and a mismatch stops start-up with an
error that names the model and what is wrong: better a server that refuses to start than one that
serves a model whose state it wires wrongly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ModelContractError
from service.runtime import ModelRuntime
from service.signature import (
    Signature,
    SignatureError,
    default_signature,
    parse_signature,
)

logger = logging.getLogger(__name__)

REQUIRED_METADATA = ("cell", "num_layers", "hidden_size", "input_size", "output_size")
SIZES = REQUIRED_METADATA[1:]
CELLS = ("rnn", "lstm", "gru")
ONNX_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}
REEXPORT = (
    "export it again (python -m training export, or export-module for a model of your own: "
    "docs/TRAINING.md) or remove its folder"
)


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know about one model version, checked against its graph."""

    name: str
    version: str
    directory: Path
    cell: str
    num_layers: int
    hidden_size: int
    input_size: int
    output_size: int
    sha256: str
    metadata: dict[str, Any] = field(repr=False)
    labels: tuple[str, ...] = field(default=(), repr=False)  # class names, one per output feature
    vocabulary: tuple[str, ...] = field(default=(), repr=False)  # tokens by id
    signature: Signature | None = field(default=None, repr=False)  # None: the default convention

    @functools.cached_property
    def tensors(self) -> Signature:
        """What the graph takes and gives, by name (:mod:`service.signature`). Cached: every
        chunk asks (a frozen dataclass still has an instance dict for it)."""
        if self.signature is not None:
            return self.signature
        return default_signature(
            self.cell, self.num_layers, self.hidden_size, self.input_size, self.output_size
        )

    @property
    def state_inputs(self) -> tuple[str, ...]:
        return self.tensors.state_inputs

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return self.tensors.state_outputs

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def version_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)


def discover(root: Path) -> list[Path]:
    """Version directories under ``root`` that hold a model.onnx. A model or version folder
    whose name starts with a dot is never one: ``.2.incoming`` is a version being copied in, to
    be renamed into place once complete (docs/API.md, Model control)."""
    if not root.is_dir():
        raise ModelContractError(
            f"model repository {root} does not exist or is not a directory; point "
            "--model-repository (RNNSERVE_MODEL_REPOSITORY) at a folder of "
            "<name>/<version>/model.onnx + model.json"
        )
    return sorted(
        path.parent
        for path in root.glob("*/*/model.onnx")
        if not path.parent.name.startswith(".") and not path.parent.parent.name.startswith(".")
    )


def no_models(root: Path) -> ModelContractError:
    """The error of a repository that holds no model."""
    return ModelContractError(
        f"model repository {root} holds no <name>/<version>/model.onnx; export a model there "
        "(python -m training export) or point --model-repository at another folder"
    )


def read_spec(directory: Path) -> ModelSpec:
    """Read and check ``model.json`` and the file hash of one version directory."""
    label = f"{directory.parent.name}/{directory.name}"
    meta_path = directory / "model.json"
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelContractError(
            f"model {label}: missing model.json beside model.onnx in {directory}; {REEXPORT}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelContractError(
            f"model {label}: {meta_path} is not valid JSON ({exc}); fix it or {REEXPORT}"
        ) from None
    if not isinstance(metadata, dict):
        raise ModelContractError(f"model {label}: {meta_path} is not a JSON object; {REEXPORT}")
    signature, original = None, metadata
    if "signature" in metadata:  # declared tensors: the sizes come from them
        try:
            signature = parse_signature(metadata["signature"])
        except SignatureError as error:
            raise ModelContractError(
                f"model {label}: {meta_path}: {error} (docs/YOUR_MODEL.md)"
            ) from None
        metadata = {**declared_sizes(signature), **metadata}
        metadata["input_size"] = signature.input_size
        metadata["output_size"] = signature.output_size
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ModelContractError(
            f"model {label}: {meta_path} lacks {', '.join(missing)} (every model.json needs "
            f"{', '.join(REQUIRED_METADATA)}); add them or {REEXPORT}"
        )
    if metadata["cell"] not in CELLS:
        raise ModelContractError(
            f"model {label}: unknown cell {metadata['cell']!r} in {meta_path} (expected one of "
            f"{', '.join(CELLS)})"
        )
    bad = [k for k in SIZES if not isinstance(metadata[k], int) or metadata[k] < 1]
    if bad:
        raise ModelContractError(
            f"model {label}: {meta_path}: {', '.join(bad)} must be whole numbers above 0"
        )
    labels = optional_texts(metadata, "labels", label, meta_path)
    if labels and len(labels) != metadata["output_size"]:
        raise ModelContractError(
            f"model {label}: {meta_path}: labels names {len(labels)} classes but output_size is "
            f"{metadata['output_size']} (one label per output feature); fix it or remove labels"
        )
    vocabulary = optional_texts(metadata, "vocabulary", label, meta_path)
    digest = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    recorded = metadata.get("sha256")
    if recorded and recorded != digest:
        raise ModelContractError(
            f"model {label}: model.onnx sha256 {digest[:12]}... does not match model.json "
            f"({str(recorded)[:12]}...); the file was changed after export: {REEXPORT}"
        )
    return ModelSpec(
        name=directory.parent.name,
        version=directory.name,
        directory=directory,
        cell=str(metadata["cell"]),
        num_layers=int(metadata["num_layers"]),
        hidden_size=int(metadata["hidden_size"]),
        input_size=int(metadata["input_size"]),
        output_size=int(metadata["output_size"]),
        sha256=digest,
        metadata=original,
        labels=labels,
        vocabulary=vocabulary,
        signature=signature,
    )


def declared_sizes(signature: Signature) -> dict[str, Any]:
    """cell, num_layers and hidden_size for a model.json that declares its tensors and says
    nothing else: read off its first state ([layers, hidden] or [hidden]), for display only."""
    first = signature.states[0].shape if signature.states else (1, 1)
    cell = "lstm" if len(signature.states) == 2 else "gru" if len(signature.states) == 1 else "rnn"
    return {"cell": cell, "num_layers": first[0] if len(first) > 1 else 1,
            "hidden_size": first[-1]}  # fmt: skip


def optional_texts(metadata: dict[str, Any], key: str, label: str, path: Path) -> tuple[str, ...]:
    """The optional list of strings ``key`` of model.json (``labels``, ``vocabulary``); empty
    when absent."""
    value = metadata.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelContractError(
            f"model {label}: {path}: {key} must be a list of strings; fix it or remove {key}"
        )
    return tuple(value)


def check_contract(spec: ModelSpec, runtime: ModelRuntime) -> None:
    """The graph's inputs must be exactly the signature's, its outputs must include the
    signature's (others are never fetched), with matching types and sizes and dynamic batch and
    time axes."""
    session = runtime.session
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    sig = spec.tensors
    expected_in = (*(i.name for i in sig.inputs), *sig.state_inputs)
    expected_out = (*(o.name for o in sig.outputs), *sig.state_outputs)
    problems: list[str] = []
    if set(inputs) != set(expected_in):
        problems.append(f"inputs are {sorted(inputs)}, expected {list(expected_in)}")
    if not set(expected_out) <= set(outputs):
        problems.append(f"outputs are {sorted(outputs)}, expected {list(expected_out)}")
    if not problems:
        wanted: dict[str, list[int | str]] = {
            **{i.name: i.graph_dims("batch", "time") for i in sig.inputs},
            **{o.name: o.graph_dims("batch", "time") for o in sig.outputs},
            **{s.input: s.graph_dims("batch") for s in sig.states},
            **{s.output: s.graph_dims("batch") for s in sig.states},
        }
        graph = {**inputs, **outputs}
        types = {i.name: ONNX_TYPES[i.dtype] for i in sig.inputs}
        for name, dims in wanted.items():
            arg = graph[name]
            expected_type = types.get(name, "tensor(float)")
            if arg.type != expected_type:
                problems.append(f"{name} has type {arg.type}, expected {expected_type}")
            shape = list(arg.shape)
            if len(shape) != len(dims):
                problems.append(f"{name} has rank {len(shape)}, expected {len(dims)} ({dims})")
                continue
            for axis, (got, want) in enumerate(zip(shape, dims, strict=True)):
                if isinstance(want, int) and isinstance(got, int) and got != want:
                    problems.append(f"{name} axis {axis} is {got}, expected {want}")
                if isinstance(want, str) and isinstance(got, int):
                    where = "batch_axis" if want == "batch" else "layout"
                    problems.append(
                        f"{name} axis {axis} ({want}) is fixed to {got} in the graph, must be "
                        f"dynamic (if the signature's {where} puts {want} at the wrong axis, fix "
                        "it in model.json; torch.onnx.export(..., dynamo=False) keeps axes dynamic)"
                    )
    if problems:
        fix = (
            "declare the graph's tensors in model.json's signature (docs/YOUR_MODEL.md)"
            if spec.signature is None
            else "fix model.json's signature (docs/YOUR_MODEL.md)"
        )
        raise ModelContractError(
            f"model {spec.label} breaks the ONNX contract: {'; '.join(problems)}; {fix}, export "
            "it with python -m training export-module (docs/TRAINING.md), or remove its folder"
        )


# ----- serving.json: a model's version policy and its own serving settings --------------------

SERVING_JSON = "serving.json"  # <repository>/<name>/serving.json, beside the version folders
POLICY_FORMS = (
    'version_policy must be "all", {"latest": N} or {"specific": ["1", "3"]} (Triton\'s forms '
    '{"latest": {"num_versions": N}} and {"specific": {"versions": [1, 3]}} too)'
)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: the ``latest`` N (by :func:`version_key`), the
    ``specific`` ones listed, or (neither) all of them, as Triton's ``version_policy``."""

    latest: int | None = None
    specific: tuple[str, ...] | None = None

    def select(self, versions: Iterable[str]) -> list[str]:
        """The versions of ``versions`` this policy serves, oldest first."""
        ordered = sorted(versions, key=version_key)
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered

    def __str__(self) -> str:
        if self.latest is not None:
            return f"latest {self.latest}"
        if self.specific is not None:
            return f"versions {', '.join(self.specific)}"
        return "all"


@dataclass(frozen=True)
class ServingConfig:
    """A model's serving.json: its version policy and the settings it sets for itself (names of
    :data:`service.settings.MODEL_SETTINGS`, values checked), in file order."""

    version_policy: VersionPolicy = VersionPolicy()
    settings: tuple[tuple[str, Any], ...] = ()


def read_serving_config(model_directory: Path) -> ServingConfig:
    """The serving.json of the model in ``model_directory`` (the defaults when there is none).
    Raises :class:`ModelContractError` with one line naming the model, the problem and what to
    do: an invalid file refuses the whole model."""
    from service.settings import MODEL_SETTINGS, model_setting

    name = model_directory.name
    path = model_directory / SERVING_JSON
    fix = "fix it or remove it (docs/API.md, Model control)"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return ServingConfig()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelContractError(
            f"model {name}: {path} is not valid JSON ({error}); {fix}"
        ) from None
    except OSError as error:  # a folder of that name, no permission: this model's problem only
        raise ModelContractError(
            f"model {name}: cannot read {path} ({error.strerror or error}); check its "
            "permissions (it must be a file the server may read), or remove it"
        ) from None
    if not isinstance(config, dict):
        raise ModelContractError(f"model {name}: {path} is not a JSON object; {fix}")
    known = ("version_policy", *MODEL_SETTINGS)
    unknown = [key for key in config if key not in known]
    if unknown:
        raise ModelContractError(
            f"model {name}: {path}: unknown key {', '.join(map(repr, unknown))} (known: "
            f"{', '.join(known)}); {fix}"
        )
    try:
        policy = version_policy(config.get("version_policy", "all"))
    except ValueError as error:
        raise ModelContractError(f"model {name}: {path}: {error}; {fix}") from None
    settings = []
    for key in MODEL_SETTINGS:
        if key in config:
            try:
                settings.append((key, model_setting(key, config[key])))
            except ValueError as error:
                raise ModelContractError(
                    f"model {name}: {path}: {key} {config[key]!r}: {error}; {fix}"
                ) from None
    return ServingConfig(policy, tuple(settings))


def version_policy(value: object) -> VersionPolicy:
    """A version_policy of serving.json (ValueError: :data:`POLICY_FORMS`)."""
    if value == "all" or value == {"all": {}}:
        return VersionPolicy()
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"{POLICY_FORMS}, got {json.dumps(value)[:80]}")
    ((kind, argument),) = value.items()
    if kind == "latest":
        if isinstance(argument, dict) and set(argument) == {"num_versions"}:
            argument = argument["num_versions"]
        if isinstance(argument, bool) or not isinstance(argument, int) or argument < 1:
            raise ValueError("version_policy latest needs a whole number of versions above 0")
        return VersionPolicy(latest=argument)
    if kind == "specific":
        if isinstance(argument, dict) and set(argument) == {"versions"}:
            argument = argument["versions"]
        if (
            not isinstance(argument, list)
            or not argument
            or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in argument)
        ):
            raise ValueError('version_policy specific needs a list of versions, e.g. ["1", "3"]')
        return VersionPolicy(specific=tuple(dict.fromkeys(str(v) for v in argument)))
    raise ValueError(f"{POLICY_FORMS}, got {json.dumps(value)[:80]}")
