"""Train the digits example's teacher (seconds on a CPU) and save it as ``teacher.safetensors`` here.

    python examples/digits/train_teacher.py

It trains on the training split that ``potstill run examples/digits/digits.yaml`` uses (potstill's
``sklearn_digits`` data, the spec's ``heldout``), so the held-out digits are new to teacher and student
alike. The model's arguments come from the spec's ``teacher.kwargs``: the spec and the weights cannot
disagree. The file is written atomically: an interrupted run never leaves a truncated teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch import nn

from digits_models import mlp
from potstill.io import save_state
from potstill.plugins.data.sklearn_digits import SklearnDigits

HERE = Path(__file__).resolve().parent


def tensors(examples: list) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.stack([torch.as_tensor(x) for x, _ in examples])
    labels = torch.tensor([y for _, y in examples])
    return features, labels


@torch.no_grad()
def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.eval()(features).argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=HERE / "digits.yaml")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = yaml.safe_load(args.spec.read_text(encoding="utf-8"))
    data = SklearnDigits(**{k: v for k, v in spec["data"].items() if k != "name"}).load(None)
    train_x, train_y = tensors(data.train)
    heldout_x, heldout_y = tensors(data.heldout)

    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and others stay free)
    torch.manual_seed(args.seed)
    model = mlp(**spec["teacher"]["kwargs"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train_y)).split(64):
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()

    destination = args.spec.parent / spec["teacher"]["weights"]
    save_state(destination, model)
    print(f"teacher: train accuracy {accuracy(model, train_x, train_y):.4f}, "
          f"held-out accuracy {accuracy(model, heldout_x, heldout_y):.4f} "
          f"({len(heldout_y)} digits) -> {destination}")


if __name__ == "__main__":
    main()
