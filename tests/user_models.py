"""my_models.py: two recurrent models of your own, and the factories that hand them to the export."""

from torch import nn


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
