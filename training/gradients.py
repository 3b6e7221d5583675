"""The vanishing-gradient picture: how much of the loss gradient reaches the state k steps back.

For a loss at the last step T of an adding-problem sequence we measure ||dL/dh_{T-k}|| / ||dL/dh_T||
(mean over a batch) with the model unrolled one step at a time, so every intermediate state is a node
whose gradient we can read.
"""

from __future__ import annotations

import numpy as np
import torch

from training.models import RecurrentNet
from training.tasks.adding import generate_adding


def gradient_ratios(
    model: RecurrentNet, length: int = 100, batch: int = 64, seed: int = 0
) -> np.ndarray:
    """Ratios for k = 0 .. length-1 (index k), measured on adding-problem sequences."""
    rng = np.random.default_rng(seed)
    seqs = generate_adding(batch, length, length, rng)
    x = torch.from_numpy(seqs.x)
    target = torch.from_numpy(seqs.target)
    state = model.zero_state(batch)
    hidden_states: list[torch.Tensor] = []
    for t in range(length):
        step_in = x[:, t : t + 1]
        if model.config.cell == "lstm":
            _, (h, c) = model.rnn(step_in, (state[0], state[1]))
            state = (h, c)
        else:
            _, h = model.rnn(step_in, state[0])
            state = (h,)
        h.retain_grad()
        hidden_states.append(h)
    prediction = model.head(state[0][-1])[:, 0]
    loss = ((prediction - target) ** 2).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = np.array(
        [float(h.grad.norm(dim=-1).mean()) if h.grad is not None else 0.0 for h in hidden_states]
    )
    last = norms[-1] if norms[-1] > 0 else 1.0
    return norms[::-1] / last  # index k: k steps before the end
