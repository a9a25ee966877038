"""Capture intermediate outputs by module path with forward hooks, without changing the model.

The idea of torchdistill's forward-hook manager: a loss names the modules it needs
(``encoder.layer.2.attention.self.query``), the trainer registers hooks for the duration of a forward
pass, and the outputs land in a dict keyed by the names the loss chose.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor, nn

from potstill.models import get_module


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot capture a module output of type {type(output).__name__}")


@contextmanager
def capture(model: nn.Module, paths: dict[str, str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, ``captured[key]`` holds the output of the module at ``paths[key]``.

    >>> with capture(bert, {"q": "encoder.layer.5.attention.self.query"}) as captured:
    ...     bert(**batch)
    >>> captured["q"].shape
    """
    captured: dict[str, Tensor] = {}
    handles = []
    by_path: dict[str, list[str]] = {}
    for key, path in paths.items():
        by_path.setdefault(path, []).append(key)
    try:
        for path, keys in by_path.items():
            module = get_module(model, path)

            def hook(_module: nn.Module, _inputs: Any, output: Any, keys: list[str] = keys) -> None:
                tensor = _first_tensor(output)
                for key in keys:
                    captured[key] = tensor

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
