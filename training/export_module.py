"""Export a user's own recurrent layer by the service's ONNX contract (docs/TRAINING.md, "Your own
model"; ``python -m training export-module``): :func:`export_recurrent` takes an ``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN`` with an optional ``nn.Embedding`` of token ids before it and an optional
per-step head after it, wraps the three in a :class:`RecurrentAdapter` with the contract's
batch-major signature, and checks what the contract cannot serve.

Any other module with the documented signature goes through :mod:`training.export_any`; the
command's factory and weights loading is :mod:`training.export_command`. Both exports share the
checks here (:func:`check_names`, :func:`check_tensors`) and the export and verification of the
bundled models (:mod:`training.export`): the TorchScript exporter (``dynamo=False``, batch and time
dynamic), and nothing is written unless onnxruntime reproduces torch over the whole sequence and
in chunks of 1, 3 and 7 steps with the state fed back. What the contract cannot serve is refused
in one line (:class:`~training.export.UnsupportedModuleError`).

torch cannot export an ``nn.LSTM`` with ``proj_size`` to ONNX ("LSTMs with projections" is
unsupported); such a layer is exported as an equivalent of fused LSTMs (:class:`ProjectedLSTM`) and
verified against the original layer in torch.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.export import (
    CHUNK_STEPS,
    EXAMPLE_BATCH,
    EXAMPLE_TIME,
    USER_SOURCE,
    Contract,
    UnsupportedModuleError,
    export_graph,
    now,
    sha256_of,
    verify_graph,
    versions,
    write_version,
)
from training.models import CellType, State

RNN_CELLS: tuple[tuple[type[nn.Module], CellType], ...] = (
    (nn.LSTM, "lstm"),
    (nn.GRU, "gru"),
    (nn.RNN, "rnn"),
)
# Keys export_recurrent computes itself; a caller's metadata may not set them.
COMPUTED_KEYS = (
    "name", "version", "cell", "num_layers", "hidden_size", "proj_size", "input_size",
    "output_size", "inputs", "outputs", "signature", "source", "verification", "opset",
    "torch_version", "onnx_version", "onnxruntime_version", "exported_at", "sha256",
)  # fmt: skip
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What torch's CPU LSTM warns when it runs one with proj_size: nothing a user can act on.
PROJECTION_WARNING = "LSTM with projections is not supported with oneDNN"


@contextmanager
def quiet_projections() -> Iterator[None]:
    """Run torch without :data:`PROJECTION_WARNING` (every other warning as before)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PROJECTION_WARNING, category=UserWarning)
        yield


class RecurrentAdapter(nn.Module):
    """A user's recurrent layer, with an optional embedding before it and a per-step head after
    it, behind the contract's signature ``(x, h0[, c0]) -> (y, hn[, cn])``, batch-major whatever
    the layer's own layout: a time-major layer (``batch_first=False``) gets ``x`` transposed in and
    ``y`` transposed out, its head applied in its own layout, exactly as the user's model runs it.
    With an ``embedding``, ``x`` is int64 token ids [batch, time] and the layer reads their
    vectors. Its attributes ``embedding``, ``rnn`` and ``head`` are the names of a state dict's
    keys (``--state-dict``)."""

    def __init__(
        self, rnn: nn.Module, head: nn.Module | None = None, embedding: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.rnn = rnn
        self.head = head if head is not None else nn.Identity()
        self.time_major = not bool(getattr(rnn, "batch_first", True))
        self.lstm = isinstance(rnn, nn.LSTM | ProjectedLSTM)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.time_major:
            x = x.transpose(0, 1)
        if self.embedding is not None:
            x = self.embedding(x)
        if self.lstm:
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        y = self.head(out)
        if self.time_major:
            y = y.transpose(0, 1)
        return (y, *new_state)

    def run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``(y, state)`` for batch-major ``x``: the reference the export is verified against."""
        y, *new_state = self(x, *state)
        return y, tuple(new_state)


class ProjectedLSTM(nn.Module):
    """An ``nn.LSTM`` with ``proj_size`` P (hidden H) as fused LSTMs that torch exports to ONNX,
    with the same call ``(x, (h0, c0)) -> (out, (hn, cn))`` and layout.

    The projected layer's state is ``h = W_hr h'``, ``h'`` the unprojected output ``o * tanh(c)``.
    Each layer becomes a plain LSTM of hidden size H over ``h'``, starting from ``h' = 0``: its
    recurrent weights are ``W_hh W_hr`` (so ``W_hh h`` at every step after the first) and its input
    is ``[x, e]``, with input weights ``[W_ih, W_hh]`` and ``e`` the layer's ``h0`` at the first step
    and zeros after (so ``W_hh h0`` at the first). Its outputs and ``hn`` are ``h'`` projected by
    ``W_hr``; ``cn`` is the plain LSTM's."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.batch_first = bool(lstm.batch_first)
        self.proj_size = int(lstm.proj_size)
        hidden = int(lstm.hidden_size)
        self.layers = nn.ModuleList()
        self.projections = nn.ParameterList()
        for k in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{k}").detach()
            w_hh = getattr(lstm, f"weight_hh_l{k}").detach()
            w_hr = getattr(lstm, f"weight_hr_l{k}").detach()
            layer = nn.LSTM(
                w_ih.shape[1] + self.proj_size, hidden, bias=lstm.bias, batch_first=True
            )
            weights = {
                "weight_ih_l0": torch.cat([w_ih, w_hh], dim=1),
                "weight_hh_l0": (w_hh.double() @ w_hr.double()).float(),
            }
            if lstm.bias:
                weights["bias_ih_l0"] = getattr(lstm, f"bias_ih_l{k}").detach()
                weights["bias_hh_l0"] = getattr(lstm, f"bias_hh_l{k}").detach()
            layer.load_state_dict(weights, strict=True)
            self.layers.append(layer)
            self.projections.append(nn.Parameter(w_hr.clone(), requires_grad=False))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h0, c0 = state
        out = x if self.batch_first else x.transpose(0, 1)
        hs, cs = [], []
        for k, (layer, w_hr) in enumerate(zip(self.layers, self.projections, strict=True)):
            later = torch.zeros_like(out[:, 1:, :1]).expand(-1, -1, self.proj_size)
            first_h = torch.cat([h0[k].unsqueeze(1), later], dim=1)
            start = (torch.zeros_like(c0[k : k + 1]), c0[k : k + 1])
            unprojected, (h_last, c_last) = layer(torch.cat([out, first_h], dim=2), start)
            out = torch.matmul(unprojected, w_hr.t())
            hs.append(torch.matmul(h_last, w_hr.t()))
            cs.append(c_last)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, (torch.cat(hs, dim=0), torch.cat(cs, dim=0))


def exportable(layer: nn.RNNBase) -> nn.Module:
    """``layer`` as torch can export it: an LSTM with projections as a :class:`ProjectedLSTM`."""
    if isinstance(layer, nn.LSTM) and layer.proj_size > 0:
        return ProjectedLSTM(layer).eval()
    return layer


def recurrent_layer(rnn: object) -> tuple[nn.RNNBase, CellType]:
    """``rnn`` and its contract cell; refuses anything but a unidirectional LSTM, GRU or RNN."""
    if not isinstance(rnn, nn.Module):
        raise UnsupportedModuleError(
            f"rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}"
        )
    if any(isinstance(m, nn.Embedding) for m in rnn.modules()):
        raise UnsupportedModuleError(
            "rnn holds an nn.Embedding: a model that takes token ids (int64) passes its "
            "embedding as embedding (export_recurrent(rnn, head, embedding=...), or a factory "
            "returning (embedding, rnn, head)) and the recurrent layer itself as rnn"
        )
    cell = next((c for cls, c in RNN_CELLS if isinstance(rnn, cls)), None)
    if cell is None or not isinstance(rnn, nn.RNNBase):
        raise UnsupportedModuleError(
            f"rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}: pass the "
            "recurrent layer itself as rnn and what follows it as head"
        )
    if rnn.bidirectional:
        raise UnsupportedModuleError(
            "a bidirectional rnn cannot stream (its backward direction needs the end of the "
            "sequence first); export a unidirectional one (bidirectional=False)"
        )
    return rnn, cell


def check_tensors(module: nn.Module, what: str) -> None:
    """Every floating-point parameter and buffer must be float32 and on the CPU."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise UnsupportedModuleError(
                f"the {what} has {str(tensor.dtype).removeprefix('torch.')} weights but the "
                "contract's inputs and states are float32; convert it with .float() before export"
            )
        if tensor.device.type != "cpu":
            raise UnsupportedModuleError(
                f"the {what} is on {tensor.device}; move it to the CPU with .cpu() before export"
            )


def probe_head(rnn: nn.RNNBase, head: nn.Module | None) -> int:
    """Run the rnn and the head once on zeros (batch and time of different sizes, in the rnn's
    layout) and return the number of outputs per step; refuse a head that is not per step."""
    layout = "[batch, time, hidden]" if rnn.batch_first else "[time, batch, hidden]"
    features = rnn.proj_size or rnn.hidden_size
    shape = (EXAMPLE_BATCH, EXAMPLE_TIME) if rnn.batch_first else (EXAMPLE_TIME, EXAMPLE_BATCH)
    with torch.no_grad():
        out = rnn(torch.zeros(*shape, rnn.input_size))[0]
        if head is None:
            return int(out.shape[2])
        try:
            y = head(out)
        except Exception as error:
            raise UnsupportedModuleError(
                f"the head fails on the rnn's outputs {list(out.shape)} {layout} ({error}); "
                f"give a head that takes {features} features per step"
            ) from None
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != tuple(shape):
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UnsupportedModuleError(
            f"the head turns the rnn's outputs {list(out.shape)} {layout} into {got}, but the "
            "contract needs the batch and time axes unchanged with outputs last; use a per-step "
            "head (e.g. nn.Linear) and pool or reshape on the client"
        )
    if y.dtype != torch.float32:
        raise UnsupportedModuleError(
            f"the head returns {str(y.dtype).removeprefix('torch.')} but the contract's output is "
            "float32; return float32 (e.g. logits rather than class ids)"
        )
    return int(y.shape[2])


def check_names(name: str, version: str, metadata: Mapping[str, Any]) -> None:
    """A model name and version are plain folder names; metadata may not set computed keys."""
    for what, value in (("name", name), ("version", version)):
        if not FOLDER_NAME.fullmatch(value):
            raise UnsupportedModuleError(
                f"model {what} {value!r} must be a plain folder name (letters, digits, '.', '_', "
                "'-', not starting with a dot)"
            )
    taken = sorted(set(metadata) & set(COMPUTED_KEYS))
    if taken:
        raise UnsupportedModuleError(
            f"metadata may not set {', '.join(taken)}: the export sets these keys itself; remove them"
        )


def check_embedding(embedding: object, rnn: nn.RNNBase) -> nn.Embedding:
    """``embedding`` if it is an ``nn.Embedding`` whose vectors the rnn reads; refuses the rest."""
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModuleError(
            f"embedding must be an nn.Embedding or None, got {type(embedding).__name__}"
        )
    if embedding.embedding_dim != rnn.input_size:
        raise UnsupportedModuleError(
            f"the embedding gives vectors of {embedding.embedding_dim} but the rnn takes "
            f"input_size={rnn.input_size}; they must be equal"
        )
    if embedding.max_norm is not None:
        raise UnsupportedModuleError(
            "the embedding has max_norm, which rescales its weights as it runs and does not "
            "export; renormalise the weights once and set max_norm=None"
        )
    check_tensors(embedding, "embedding")
    return embedding


def export_recurrent(
    rnn: nn.Module,
    head: nn.Module | None = None,
    *,
    embedding: nn.Module | None = None,
    repository: Path,
    name: str,
    version: str = "1",
    metadata: Mapping[str, Any] | None = None,
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a user's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (any number of layers, batch-first or
    time-major, unidirectional, LSTM ``proj_size`` too), an optional ``nn.Embedding`` of token ids
    before it and an optional per-step ``head`` after it to
    ``<repository>/<name>/<version>/model.onnx`` + ``model.json`` by the contract.

    The modules are put in eval mode, wrapped in a :class:`RecurrentAdapter`, exported with the
    TorchScript exporter (``dynamo=False``, opset 17) and verified against PyTorch with onnxruntime
    over a whole sequence and in chunks of 1, 3 and 7 steps with the state fed back, at 3 x 37
    steps (the trace is 2 x 5), before anything is written. An LSTM with ``proj_size`` gets
    ``proj_size`` and a ``signature`` (``h`` of [layers, proj_size], ``c`` of [layers,
    hidden_size]) in model.json. With an ``embedding`` (``padding_idx`` allowed) the graph takes
    int64 token ids ``x`` [batch, time], the verification feeds random ids below its
    ``num_embeddings``, and model.json's ``signature`` declares ``x`` as one int64 id per step
    with ``"range": [0, num_embeddings]``. ``metadata`` adds keys to model.json (e.g.
    ``description``, ``task``, ``output_kind``, ``labels``, ``vocabulary``); ``origin`` is
    recorded under ``source`` (the command puts the factory and weights file there). Returns the
    metadata.

    Raises :class:`UnsupportedModuleError` for what the contract cannot serve (bidirectional,
    a head that changes the batch or time axes, non-float32 weights, an embedding inside ``rnn``)
    and :class:`ExportVerificationError` when the graph does not reproduce PyTorch.
    """
    extra = dict(metadata or {})
    check_names(name, version, extra)
    layer, cell = recurrent_layer(rnn)
    check_tensors(layer, "rnn")
    if head is not None:
        if not isinstance(head, nn.Module):
            raise UnsupportedModuleError(
                f"head must be an nn.Module or None, got {type(head).__name__}"
            )
        check_tensors(head, "head")
    embedded = None if embedding is None else check_embedding(embedding, layer)
    # The reference: the user's modules in torch.
    adapter = RecurrentAdapter(layer, head, embedded).eval()
    with quiet_projections():
        output_size = probe_head(layer, head)
    contract = Contract(
        cell,
        layer.num_layers,
        layer.hidden_size,
        layer.input_size,
        output_size,
        layer.proj_size,
        0 if embedded is None else embedded.num_embeddings,
    )
    version_dir = repository / name / version
    with tempfile.TemporaryDirectory(prefix="rnnserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        label = f"model {name}/{version}"
        exported = RecurrentAdapter(exportable(layer), head, embedded).eval()
        export_graph(exported, contract, onnx_path, label)
        with quiet_projections():
            verification = verify_graph(
                adapter.run, contract, onnx_path, chunk_steps=CHUNK_STEPS, label=label
            )
        record: dict[str, Any] = {
            "name": name,
            "version": version,
            "description": "",
            **extra,
            "cell": cell,
            "num_layers": contract.num_layers,
            "hidden_size": contract.hidden_size,
            **({"proj_size": contract.proj_size} if contract.proj_size else {}),
            # Values per step of a chunk: one token id, or the layer's features.
            "input_size": 1 if embedded is not None else contract.input_size,
            "output_size": contract.output_size,
            **({} if embedded is None else {"embedding": embedding_record(embedded)}),
            "inputs": contract.input_names,
            "outputs": contract.output_names,
            **({} if contract.conventional else {"signature": contract.signature()}),
            "source": {
                "exported_from": USER_SOURCE,
                **({} if embedded is None else {"embedding": repr(embedded)}),
                "rnn": repr(rnn),
                "head": None if head is None else repr(head),
                "layout": "batch-first"
                if layer.batch_first
                else "time-major (transposed in the graph)",
                **dict(origin or {}),
            },
            "verification": verification.as_dict(),
            **versions(),
            "exported_at": now(),
            "sha256": sha256_of(onnx_path),
        }
        write_version(version_dir, onnx_path, record)
    return record


def embedding_record(embedding: nn.Embedding) -> dict[str, Any]:
    """model.json's ``embedding``: how many ids it takes, its vectors' size, its padding id."""
    return {
        "num_embeddings": embedding.num_embeddings,
        "embedding_dim": embedding.embedding_dim,
        "padding_idx": embedding.padding_idx,
    }
