"""Small helpers for finding and replacing parts of torch models by module path."""

from __future__ import annotations

from torch import nn

#: where common transformer implementations keep their stack of layers
_LAYER_PATHS = ("encoder.layer", "transformer.h", "model.layers", "layers", "transformer.layer", "h", "blocks")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``get_module(bert, "encoder.layer.5.attention")``; a clear error names the missing part."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"module path {path!r} not found in {type(model).__name__}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The path and the ModuleList of a model's repeated layers (transformer blocks, MLP blocks).

    Looks at ``path`` if given, then at the places common implementations use, then at the longest
    ModuleList whose members all have one type.
    """
    candidates = [path] if path else list(_LAYER_PATHS)
    for candidate in candidates:
        try:
            module = get_module(model, candidate)
        except KeyError:
            continue
        if isinstance(module, nn.ModuleList):
            return candidate, module
    if path:
        raise KeyError(f"{path!r} is not a ModuleList in {type(model).__name__}")
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise KeyError(f"no stack of layers (nn.ModuleList) found in {type(model).__name__}; give its path")
    return best


def layer_path(model: nn.Module, index: int, layers_path: str | None = None) -> str:
    """Module path of layer ``index`` (negative counts from the end)."""
    path, layers = find_layers(model, layers_path)
    if not -len(layers) <= index < len(layers):
        raise IndexError(f"layer {index} out of range: the model has {len(layers)} layers")
    return f"{path}.{index % len(layers)}"


#: (query, key, value) projection names used by common attention implementations
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"), ("wq", "wk", "wv"))


def qkv_paths(model: nn.Module, index: int, layers_path: str | None = None) -> tuple[str, str, str]:
    """Paths of the query, key and value projections in layer ``index``."""
    base = layer_path(model, index, layers_path)
    layer = get_module(model, base)
    names = {name.rsplit(".", 1)[-1]: name for name, _ in layer.named_modules() if name}
    for q, k, v in _QKV_NAMES:
        if q in names and k in names and v in names:
            return f"{base}.{names[q]}", f"{base}.{names[k]}", f"{base}.{names[v]}"
    raise KeyError(f"no separate query/key/value projections found in {base} ({type(layer).__name__})")


def num_attention_heads(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
