"""The model of the digits example: a residual MLP for 8x8 digit images (64 features, 10 classes).

Its hidden blocks form one ``nn.ModuleList`` (``blocks``) of identical width, so potstill's ``layer_drop``
can build a student from any subset of them. Each block is residual (``x + f(x)``), like a transformer
layer: a block removed leaves the others' inputs close to what they were trained on, which is why a
layer-dropped student starts near its teacher.
"""

from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    """``x + Linear(ReLU(Linear(LayerNorm(x))))``, a pre-norm residual block."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.fc2(self.fc1(self.norm(x)).relu()))


class MLP(nn.Module):
    def __init__(self, width: int, depth: int, in_features: int, classes: int, dropout: float):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def mlp(hidden: list[int], in_features: int = 64, classes: int = 10, dropout: float = 0.0) -> MLP:
    """An MLP with one residual block per entry of ``hidden``, e.g. ``mlp([128, 128, 128, 128])``.

    The widths must be equal: a block's output feeds the next block, whichever blocks a student keeps.
    """
    if not hidden or len(set(hidden)) != 1:
        raise ValueError(f"mlp: hidden must list one width per block, all equal (layer_drop needs that), got {hidden}")
    return MLP(hidden[0], len(hidden), in_features, classes, dropout)
