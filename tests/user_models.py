"""my_models.py: recurrent models of your own, and the factories that hand them to the export."""

import torch
from torch import nn

from training.export_any import features, token_ids


class FrameClassifier(nn.Module):
    """Speech frames in (40 filterbank features), one of 10 classes out per frame (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size=40, hidden_size=64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: [batch, time, 40]
        out, _ = self.rnn(x)
        return self.head(out)


def frame_classifier():
    """The factory: the recurrent layer and the head, which acts on each step's output."""
    model = FrameClassifier()
    return model.rnn, model.head


def gru_regressor():
    """A time-major GRU (x: [time, batch, 4]) and a two-layer head: one value per step."""
    rnn = nn.GRU(input_size=4, hidden_size=32)
    head = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    return rnn, head


class CharLM(nn.Module):
    """A character-level language model: token ids in, logits of the next character out."""

    def __init__(self, vocabulary: int = 96) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 64)
        self.rnn = nn.LSTM(input_size=64, hidden_size=512, num_layers=2, batch_first=True)
        self.head = nn.Linear(512, vocabulary)

    def forward(self, ids):  # ids: [batch, time] int64
        out, _ = self.rnn(self.embedding(ids))
        return self.head(out)


def char_lm():
    """Token ids: the factory returns the embedding too, as (embedding, rnn, head)."""
    model = CharLM()
    return model.embedding, model.rnn, model.head


class TwoHeads(nn.Module):
    """Any module of this form exports: inputs, then states in; outputs, then new states out,
    batch-major. Here token ids and 2 features per step in, 20 logits and a value out."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(input_size=8 + 2, hidden_size=32, batch_first=True)
        self.classes = nn.Linear(32, 20)
        self.value = nn.Linear(32, 1)

    def forward(self, tokens, feats, h0, c0):  # [batch, time], [batch, time, 2], [1, batch, 32]
        x = torch.cat([self.embedding(tokens), feats], dim=2)
        out, (hn, cn) = self.rnn(x, (h0, c0))
        return self.classes(out), self.value(out), hn, cn


def two_heads():
    """Any module: the factory names its inputs, outputs (sizes read off a trial run) and states
    (shape per session; the batch goes at axis 1)."""
    return {
        "module": TwoHeads(),
        "inputs": [token_ids("tokens", 20), features("features", 2)],
        "outputs": ["logits", "value"],
        "states": [("h0", "hn", [1, 32]), ("c0", "cn", [1, 32])],
    }
