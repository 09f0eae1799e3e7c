"""Forecasting models (torch). Each takes raw KPI windows ``[batch, window, 4]`` and returns the
next interval's internet demand in raw units ``[batch]``: normalization lives inside the module,
so the exported ONNX graph needs nothing around it.

``paper`` and ``delta_mlp`` normalize with statistics of their training site (buffers); ``bilstm``
normalizes each window by its own levels, so one model serves sites of any level."""

from __future__ import annotations

import torch
from torch import nn

from forecaster.core.online import SCALE_FLOOR
from forecaster.core.windows import Normalizer


class _Scaled(nn.Module):
    """Holds the input normalization and the target scale as buffers."""

    def __init__(self, normalizer: Normalizer, n_features: int) -> None:
        super().__init__()
        self.register_buffer("x_mean", torch.as_tensor(normalizer.mean, dtype=torch.float32).reshape(n_features))
        self.register_buffer("x_std", torch.as_tensor(normalizer.std, dtype=torch.float32).reshape(n_features))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    @property
    def target_std(self) -> torch.Tensor:
        return self.x_std[0]


class PaperBiLSTM(_Scaled):
    """Table I of the paper: BiLSTM 128 → BiLSTM 128 → BiLSTM 64 → Dense 1, each recurrent layer
    followed by BatchNorm and dropout 0.2."""

    kind = "paper"

    def __init__(self, normalizer: Normalizer, window: int = 10, n_features: int = 4,
                 dropout: float = 0.2) -> None:
        super().__init__(normalizer, n_features)
        self.config = {"window": window, "n_features": n_features, "dropout": dropout}
        self.lstm1 = nn.LSTM(n_features, 128, batch_first=True, bidirectional=True)
        self.bn1 = nn.BatchNorm1d(256)
        self.lstm2 = nn.LSTM(256, 128, batch_first=True, bidirectional=True)
        self.bn2 = nn.BatchNorm1d(256)
        self.lstm3 = nn.LSTM(256, 64, batch_first=True, bidirectional=True)
        self.bn3 = nn.BatchNorm1d(128)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(128, 1)

    def _seq_norm(self, bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        return self.drop(bn(h.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale(x)
        h, _ = self.lstm1(z)
        h = self._seq_norm(self.bn1, h)
        h, _ = self.lstm2(h)
        h = self._seq_norm(self.bn2, h)
        _, (h_n, _) = self.lstm3(h)
        last = torch.cat([h_n[-2], h_n[-1]], dim=1)  # forward and backward final states
        out = self.head(self.drop(self.bn3(last))).squeeze(1)
        return out * self.x_std[0] + self.x_mean[0]


class DeltaMLP(_Scaled):
    """Production model: an MLP that predicts the change from the last observed internet value.

    Inputs are the normalized window and each step's difference from the last step, so the
    network only has to learn corrections to persistence. Several small members, each trained
    on its own loss, are averaged: it steadies accuracy across seeds at a few thousand
    parameters each.
    """

    kind = "delta_mlp"

    def __init__(self, normalizer: Normalizer, window: int = 10, n_features: int = 4,
                 hidden: int = 64, members: int = 1) -> None:
        super().__init__(normalizer, n_features)
        self.config = {"window": window, "n_features": n_features, "hidden": hidden, "members": members}
        self.members = nn.ModuleList(
            nn.Sequential(
                nn.Linear(2 * window * n_features, hidden), nn.GELU(),
                nn.Linear(hidden, hidden), nn.GELU(),
                nn.Linear(hidden, 1),
            )
            for _ in range(members)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale(x)
        rel = z - z[:, -1:, :]
        features = torch.cat([z.flatten(1), rel.flatten(1)], dim=1)
        return x[:, -1, 0] + self.member_deltas(features).mean(dim=1) * self.x_std[0]

    def member_deltas(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(features) for m in self.members], dim=1)

    def member_forecasts(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's own forecast ``[batch, members]``: trained side by side as an ensemble."""
        z = self.scale(x)
        rel = z - z[:, -1:, :]
        deltas = self.member_deltas(torch.cat([z.flatten(1), rel.flatten(1)], dim=1))
        return x[:, -1, 0:1] + deltas * self.x_std[0]


class WindowBiLSTM(nn.Module):
    """Production model: a small bidirectional LSTM on the window scaled by its own levels.

    Each KPI is divided by its mean over the window (floored, as the online headroom's scale), and
    every KPI also by the internet mean, which keeps the ratios between KPIs; the network sees those
    and each step's difference from the last step. It predicts the change from the last internet
    value relative to the window's internet level, so the output is ``last + level * delta`` in raw
    units and scaling a site's demand scales its forecast. No statistics of a training site are
    stored: the ``normalizer`` argument is accepted for :func:`build_model` and ignored.
    """

    kind = "bilstm"
    scale_free = True

    def __init__(self, normalizer: Normalizer | None = None, window: int = 10, n_features: int = 4,
                 hidden: int = 32, layers: int = 1, members: int = 1) -> None:
        super().__init__()
        self.config = {"window": window, "n_features": n_features, "hidden": hidden, "layers": layers,
                       "members": members}
        self.lstms = nn.ModuleList(nn.LSTM(3 * n_features, hidden, num_layers=layers, batch_first=True,
                                           bidirectional=True) for _ in range(members))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
                                   for _ in range(members))

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        level = x.mean(dim=1, keepdim=True).clamp_min(SCALE_FLOOR)  # [batch, 1, features]
        own = x / level
        internet = level[:, :, 0:1]
        z = torch.cat([own - 1.0, own - own[:, -1:, :], x / internet - 1.0], dim=2)
        return z, internet[:, 0, 0]

    def member_deltas(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        for lstm, head in zip(self.lstms, self.heads, strict=True):
            _, (h_n, _) = lstm(z)
            out.append(head(torch.cat([h_n[-2], h_n[-1]], dim=1)))  # last layer, both directions
        return torch.cat(out, dim=1)

    def member_forecasts(self, x: torch.Tensor) -> torch.Tensor:
        z, scale = self._inputs(x)
        return x[:, -1, 0:1] + self.member_deltas(z) * scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, scale = self._inputs(x)
        return x[:, -1, 0] + self.member_deltas(z).mean(dim=1) * scale


MODEL_KINDS: dict[str, type[nn.Module]] = {"paper": PaperBiLSTM, "delta_mlp": DeltaMLP, "bilstm": WindowBiLSTM}
PRODUCTION_KIND = "bilstm"


def is_scale_free(kind: str) -> bool:
    return bool(getattr(MODEL_KINDS.get(kind), "scale_free", False))


def build_model(kind: str, normalizer: Normalizer, **config) -> nn.Module:
    try:
        cls = MODEL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}") from None
    return cls(normalizer, **config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
