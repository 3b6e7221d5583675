"""One recurrent model for every experiment: an RNN (tanh), LSTM or GRU stack with a linear head.

The state is explicit: ``forward(x, state)`` returns ``(y, new_state)`` where the state is ``(h,)``
for RNN and GRU and ``(h, c)`` for LSTM, each [layers, batch, hidden]. This is the shape of the ONNX
contract the service relies on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

CellType = Literal["rnn", "lstm", "gru"]
InitMode = Literal["keep", "default"]
CELLS: tuple[CellType, ...] = ("rnn", "lstm", "gru")

State = tuple[torch.Tensor, ...]

KEEP_BIAS = 5.0
# sigmoid(30) rounds to exactly 1.0 in float32: a forget gate pinned open.
OPEN_GATE_BIAS = 30.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`RecurrentNet`.

    ``init="keep"`` starts gated cells near "keep the state": LSTM forget-gate bias ``+5``, GRU
    update-gate bias ``+5`` (PyTorch's GRU keeps the state when z is near 1). ``init="default"`` keeps
    PyTorch's initialisation. ``forget_gate=False`` (LSTM only) pins the forget gate at exactly 1, the
    original 1997 LSTM, for the continual Reber comparison.
    """

    cell: CellType
    input_size: int
    output_size: int
    hidden_size: int = 64
    num_layers: int = 1
    init: InitMode = "keep"
    forget_gate: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecurrentNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"unknown cell {config.cell!r}; choose one of {', '.join(CELLS)}")
        if not config.forget_gate and config.cell != "lstm":
            raise ValueError("forget_gate=False applies to LSTM only")
        self.config = config
        rnn_class = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.rnn = rnn_class(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, config.output_size)
        if config.init == "keep":
            apply_keep_init(self.rnn, config.cell, config.hidden_size)
        if not config.forget_gate:
            pin_forget_gate_open(self.rnn, config.hidden_size)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def zero_state(self, batch: int) -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape) for _ in self.state_names)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.zero_state(x.shape[0])
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        return self.head(out), new_state


def gate_slice(hidden: int, gate: int) -> slice:
    return slice(gate * hidden, (gate + 1) * hidden)


def apply_keep_init(rnn: nn.Module, cell: CellType, hidden: int) -> None:
    """Bias gated cells towards keeping their state (LSTM forget gate, GRU update gate) at +5."""
    if cell == "rnn":
        return
    # PyTorch gate order: LSTM (i, f, g, o) -> forget is gate 1; GRU (r, z, n) -> update is gate 1.
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                param[gate_slice(hidden, 1)] = KEEP_BIAS
            elif name.startswith("bias_hh"):
                param[gate_slice(hidden, 1)] = 0.0


def pin_forget_gate_open(rnn: nn.Module, hidden: int) -> None:
    """Make an nn.LSTM's forget gate exactly 1 forever: zero its weights, saturate its bias, freeze it."""
    forget = gate_slice(hidden, 1)
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("weight"):
                param[forget] = 0.0
            elif name.startswith("bias_ih"):
                param[forget] = OPEN_GATE_BIAS
            else:
                param[forget] = 0.0
            mask = torch.ones_like(param)
            mask[forget] = 0.0
            param.register_hook(lambda grad, mask=mask: grad * mask)


class ExportWrapper(nn.Module):
    """The ONNX signature: ``(x, h0[, c0]) -> (y, hn[, cn])`` with flat tensors, no tuples."""

    def __init__(self, model: RecurrentNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new_state = self.model(x, tuple(state))
        return (y, *new_state)
