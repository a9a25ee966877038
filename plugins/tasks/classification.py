"""Classification of feature vectors (for example sklearn's digits): the model maps ``x`` to logits.

Quality: ``accuracy`` against the labels, and ``agreement``, the fraction of examples where the
candidate predicts the same class as the reference (the teacher).

YAML:  {name: classification}
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from potstill.hookspecs import hookimpl
from potstill.techniques import Dataset, Outputs, Task


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class Classification(Task):
    name = "classification"
    default_data = {"name": "sklearn_digits"}
    primary_metric = "accuracy"

    def collate(self, examples: list[Any], tokenizer: Any = None, pad_to: int | None = None) -> dict[str, Tensor]:
        features = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in examples])
        labels = torch.tensor([int(y) for _, y in examples], dtype=torch.long)
        return {"x": features, "labels": labels}

    def forward(self, model: nn.Module, batch: dict[str, Tensor], hidden_states: bool = False) -> Outputs:
        return Outputs(logits=model(batch["x"]))

    def export_module(self, model: nn.Module) -> nn.Module:
        return _Logits(model)

    def export_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"]}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"x": {0: "batch"}}

    def output_name(self) -> str:
        return "logits"

    def benchmark_batch(self, data: Dataset, tokenizer: Any, batch_size: int, seq_len: int) -> dict[str, Tensor]:
        return self.collate([data.heldout[i % len(data.heldout)] for i in range(batch_size)])

    def evaluate(self, reference: Callable[[dict[str, Tensor]], Tensor], candidate: Callable[[dict[str, Tensor]], Tensor],
                 batches: list[dict[str, Tensor]]) -> dict[str, float]:
        labels = torch.cat([b["labels"] for b in batches])
        ref = torch.cat([torch.as_tensor(reference(b)).argmax(-1) for b in batches])
        cand = torch.cat([torch.as_tensor(candidate(b)).argmax(-1) for b in batches])
        return {
            "accuracy": float((cand == labels).double().mean()),
            "agreement": float((cand == ref).double().mean()),
        }


@hookimpl
def register_tasks(register):
    register(Classification)
