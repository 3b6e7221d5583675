"""The helpers of ``python -m training export-module`` (docs/TRAINING.md, "Your own model"): call
the factory named by ``--factory`` and take what it returns as the parts of one of the two exports
(:func:`load_factory`), load ``--state-dict`` into them (:func:`load_weights`), export them with
the export they are for (:func:`export_parts`: :func:`training.export_module.export_recurrent` or
:func:`training.export_any.export_module`) and say in one line what was exported
(:func:`summary`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.signature import TensorSpec, parse_signature
from training.export_any import InputLike, OutputLike, StateLike, export_module
from training.export_module import RecurrentAdapter, export_recurrent


class FactoryError(ValueError):
    """A --factory or --state-dict that cannot be used; the message says what to do."""


@dataclass
class RecurrentParts:
    """What a factory returns for :func:`export_recurrent`."""

    rnn: nn.Module
    head: nn.Module | None = None
    embedding: nn.Module | None = None

    def adapter(self) -> nn.Module:
        return RecurrentAdapter(self.rnn, self.head, self.embedding)


@dataclass
class ModuleParts:
    """What a factory returns for :func:`export_module`."""

    module: nn.Module
    inputs: Sequence[InputLike]
    outputs: Sequence[OutputLike]
    states: Sequence[StateLike]


FACTORY_FORMS = (
    "the rnn alone, (rnn, head), (embedding, rnn, head), a dict with keys rnn and optionally "
    "embedding and head, or a dict with keys module, inputs, outputs and states"
)


def parts_of(built: object, spec: str) -> RecurrentParts | ModuleParts:
    """A factory's return value as the parts of one of the two exports."""
    if isinstance(built, nn.Module):
        return RecurrentParts(built)
    if isinstance(built, tuple | list) and len(built) == 2:
        return RecurrentParts(built[0], built[1])
    if isinstance(built, tuple | list) and len(built) == 3:
        return RecurrentParts(built[1], built[2], built[0])
    if isinstance(built, Mapping) and "module" in built:
        unknown = sorted(set(built) - {"module", "inputs", "outputs", "states"})
        missing = sorted({"inputs", "outputs", "states"} - set(built))
        if not unknown and not missing:
            return ModuleParts(built["module"], built["inputs"], built["outputs"], built["states"])
        problem = f"unknown keys {unknown}" if unknown else f"no {', '.join(missing)}"
        raise FactoryError(f"{spec} returned a dict with {problem}; it must return {FACTORY_FORMS}")
    if isinstance(built, Mapping) and "rnn" in built:
        unknown = sorted(set(built) - {"embedding", "rnn", "head"})
        if not unknown:
            return RecurrentParts(built["rnn"], built.get("head"), built.get("embedding"))
        raise FactoryError(
            f"{spec} returned a dict with unknown keys {unknown}; it must return {FACTORY_FORMS}"
        )
    raise FactoryError(f"{spec} returned {type(built).__name__}; it must return {FACTORY_FORMS}")


def load_factory(spec: str) -> RecurrentParts | ModuleParts:
    """Call ``package.module:function`` and return what it built (:data:`FACTORY_FORMS`)."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise FactoryError(f"--factory must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FactoryError(
            f"cannot import {module_name} ({error}); run from the folder that holds it or add "
            "that folder to PYTHONPATH"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise FactoryError(f"{module_name} has no function {function_name!r}")
    return parts_of(factory(), spec)


def load_weights(parts: RecurrentParts | ModuleParts, path: Path) -> None:
    """Load a state dict into the factory's modules, strictly: the module's own, or for a
    recurrent layer one with keys ``rnn.*``, ``head.*`` and ``embedding.*`` (that of a model whose
    layers are its attributes ``rnn``, ``head`` and ``embedding``)."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise FactoryError(f"cannot read --state-dict {path} ({error})") from None
    if not isinstance(weights, Mapping):
        raise FactoryError(
            f"--state-dict {path} holds a {type(weights).__name__}, not a state dict"
        )
    recurrent = isinstance(parts, RecurrentParts)
    target = parts.adapter() if isinstance(parts, RecurrentParts) else parts.module
    try:
        target.load_state_dict(weights, strict=True)
    except (RuntimeError, AttributeError) as error:
        detail = " ".join(str(error).split())[:400]
        expected = (
            "save the state dict of a model whose layers are attributes rnn, head and "
            "embedding, or load the weights in the factory"
            if recurrent
            else "save the module's own state dict, or load the weights in the factory"
        )
        raise FactoryError(
            f"--state-dict {path} does not fit the factory's modules ({detail}); {expected}"
        ) from None


def export_parts(
    parts: RecurrentParts | ModuleParts,
    *,
    repository: Path,
    name: str,
    version: str = "1",
    metadata: Mapping[str, Any] | None = None,
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export what a factory built with the export it is for."""
    if isinstance(parts, RecurrentParts):
        return export_recurrent(
            parts.rnn, parts.head, embedding=parts.embedding, repository=repository, name=name,
            version=version, metadata=metadata, origin=origin,
        )  # fmt: skip
    return export_module(
        parts.module, inputs=parts.inputs, outputs=parts.outputs, states=parts.states,
        repository=repository, name=name, version=version, metadata=metadata, origin=origin,
    )  # fmt: skip


def summary(metadata: Mapping[str, Any]) -> str:
    """One line on an exported model: what it takes and gives, and how close the graph is."""
    verification = metadata["verification"]
    within = max(verification["full_sequence_max_abs_diff"], verification["streaming_max_abs_diff"])
    if "cell" in metadata:
        taken = (
            f"token ids [0, {metadata['embedding']['num_embeddings']})"
            if "embedding" in metadata
            else str(metadata["input_size"])
        )
        shape = (
            f"{metadata['cell']}, {metadata['num_layers']} layer(s) of {metadata['hidden_size']}, "
            f"in={taken} out={metadata['output_size']}"
        )
    else:
        signature = parse_signature(metadata["signature"])

        def tensor(t: TensorSpec) -> str:
            if t.value_range is not None:
                return f"{t.name} (ids [{t.value_range[0]}, {t.value_range[1]}))"
            return f"{t.name} {list(t.shape)}"

        shape = (
            f"in {', '.join(tensor(t) for t in signature.inputs)}; out "
            f"{', '.join(tensor(t) for t in signature.outputs)}; states "
            f"{', '.join(f'{s.input} {list(s.shape)}' for s in signature.states) or 'none'}"
        )
    return (
        f"{shape}; onnxruntime within {within:.2g} of torch (chunks of "
        f"{', '.join(verification['chunkings'])} steps)"
    )
