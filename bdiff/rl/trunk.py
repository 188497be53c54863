"""The state trunk both agents share, so they differ only in their return head."""
from torch import nn


class Trunk(nn.Sequential):
    def __init__(self, n_features, hidden=128):
        super().__init__(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
