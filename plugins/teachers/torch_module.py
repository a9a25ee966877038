"""The user's own torch module as the teacher: a ``module:function`` factory and a safetensors file.

This is the one place a spec names code, and it is the user's own: the factory is imported (the spec's
folder is on the import path while it is) and called with ``kwargs``; the weights are loaded strictly.

YAML:  {name: torch, factory: "my_models:build_mlp", weights: teacher.safetensors, kwargs: {hidden: 128}}
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from pydantic import Field

from potstill.hookspecs import hookimpl
from potstill.io import load_tensors, sha256
from potstill.techniques import Context, ExistingPath, LoadedModel, Options, Teacher


class TorchTeacher(Teacher):
    name = "torch"

    class Options(Options):
        factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function returning an nn.Module")
        weights: ExistingPath | None = Field(None, description="safetensors state dict for the module")
        kwargs: dict[str, Any] = Field(default_factory=dict)
        tokenizer: str | None = Field(None, description="a Hugging Face tokenizer folder, for text tasks")

    def fingerprint(self) -> str:
        return sha256(self.options.weights) if self.options.weights else ""

    def load(self, ctx: Context) -> LoadedModel:
        module_name, function_name = self.options.factory.split(":")
        sys.path.insert(0, str(ctx.base_dir))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"teacher.factory: cannot import {module_name!r} ({exc}); put it next to the spec or install it") from None
        finally:
            sys.path.remove(str(ctx.base_dir))
        factory = getattr(module, function_name, None)
        if not callable(factory):
            raise ValueError(f"teacher.factory: {module_name!r} has no function {function_name!r}")
        model = factory(**self.options.kwargs)
        if self.options.weights:
            model.load_state_dict(load_tensors(self.options.weights), strict=True)
        tokenizer = None
        if self.options.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.options.tokenizer)
        return LoadedModel(model=model.eval(), tokenizer=tokenizer,
                           description=f"{type(model).__name__} from {self.options.factory}")


@hookimpl
def register_teachers(register):
    register(TorchTeacher)
