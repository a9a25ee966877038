"""The base classes a technique of each kind subclasses, and the values that pass between stages.

Behaviour lives on these classes; hooks only register them. Every technique has a ``name`` and an
``Options`` pydantic model (unknown keys are errors); it is constructed with validated options and
receives a :class:`Context` when it runs.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo
from torch import Tensor, nn

from potstill.errors import MissingDependency

__all__ = [
    "Options",
    "ExistingPath",
    "LossOptions",
    "Technique",
    "Task",
    "Data",
    "Dataset",
    "Teacher",
    "LoadedModel",
    "Student",
    "Loss",
    "Pruner",
    "Quantizer",
    "Decoder",
    "Exporter",
    "Artifact",
    "Outputs",
    "Context",
]


class Options(BaseModel):
    """Base of every technique's options: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _existing_path(value: str, info: ValidationInfo) -> str:
    """A file or folder that must exist; relative paths are relative to the spec's folder."""
    base = Path((info.context or {}).get("base_dir", "."))
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise ValueError(f"file not found: {path} (paths are relative to the spec's folder)")
    return str(path.resolve())


#: an option naming a file that must exist (relative to the spec's folder)
ExistingPath = Annotated[str, AfterValidator(_existing_path)]


class LossOptions(Options):
    """Options every loss has: its weight in the stage's sum and how that weight changes over the steps.

    ``schedule``: ``constant``; ``linear_warmup`` (0 → weight over ``warmup_steps``); ``cosine_decay``
    (weight → ``final_weight`` along a half cosine over the stage). ``stop_at`` switches the loss off from that
    step on (HASTE-style termination of an auxiliary loss); a loss at weight 0 is not computed.
    """

    weight: float = Field(1.0, ge=0, description="multiplier of this loss in the stage's sum")
    schedule: Literal["constant", "linear_warmup", "cosine_decay"] = Field("constant", description="weight schedule")
    warmup_steps: int = Field(0, ge=0, description="steps of the linear warm-up (schedule: linear_warmup)")
    final_weight: float = Field(0.0, ge=0, description="weight at the last step (schedule: cosine_decay)")
    stop_at: int | None = Field(None, ge=0, description="step from which this loss is switched off")

    def weight_at(self, step: int, total_steps: int) -> float:
        """The weight at ``step`` (0-based) of a stage of ``total_steps`` steps."""
        if self.stop_at is not None and step >= self.stop_at:
            return 0.0
        if self.schedule == "linear_warmup" and self.warmup_steps:
            return self.weight * min(1.0, (step + 1) / self.warmup_steps)
        if self.schedule == "cosine_decay":
            progress = min(1.0, step / max(1, total_steps - 1))
            return self.final_weight + (self.weight - self.final_weight) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.weight


class Technique:
    """A named, configurable technique. Subclasses set ``name`` and usually ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    #: optional imports this technique needs, as ``{module: pip requirement}``; checked at validation
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Options | None = None, **kwargs: Any):
        super().__init__()
        self.options = options if options is not None else self.Options(**kwargs)

    @classmethod
    def missing_dependencies(cls) -> list[str]:
        """``pip install`` lines for each optional dependency that is not importable."""
        missing = []
        for module, requirement in cls.requires.items():
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(f"needs {module}: pip install '{requirement}'")
        return missing

    @classmethod
    def check_dependencies(cls) -> None:
        missing = cls.missing_dependencies()
        if missing:
            raise MissingDependency(f"{cls.name}: {'; '.join(missing)}")

    def fingerprint(self) -> str:
        """Extra cache-key material beyond the options (for example the hash of an input file)."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# --------------------------------------------------------------------------------------------------
# values passed between stages
# --------------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What a model (teacher or student) produced for one batch.

    ``features`` holds intermediate outputs captured by module path (see :mod:`potstill.capture`),
    keyed by the names the consuming loss asked for.
    """

    logits: Tensor | None = None
    embeddings: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attention_mask: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)

    def require(self, attribute: str, who: str) -> Tensor:
        value = getattr(self, attribute)
        if value is None:
            raise ValueError(f"{who} needs `{attribute}` from the model, but the task did not produce it")
        return value


@dataclass
class Dataset:
    """Examples for training and held-out evaluation (strings, or ``(features, label)`` pairs)."""

    train: list[Any]
    heldout: list[Any]
    description: str = ""


class ExternalOutput(dict):
    """What an :class:`ExternalTeacher` returns: ``logits`` (and ``last_hidden_state`` / ``hidden_states`` where
    it has them), readable as attributes like a Hugging Face ``ModelOutput``."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


class ExternalTeacher(nn.Module):
    """A teacher model without local weights, called like the task's models are (for ``causal_lm`` and
    ``sentence_embedding`` ``model(input_ids=..., attention_mask=..., output_hidden_states=...)`` returning an
    :class:`ExternalOutput`; for ``classification`` ``model(x)`` returning logits). The pipeline does not copy,
    train or export it; the report times it only when ``onnx_path`` names an ONNX file that computes it.

    Teachers that only know a distribution's top k (an API, a cache) also implement ``topk(batch, k)`` returning
    ``(indices, logprobs)`` of shape ``[..., k]`` (natural-log probabilities normalised over the vocabulary),
    which :mod:`sparse_topk_kd` uses in place of the dense logits.
    """

    local_weights: ClassVar[bool] = False
    #: an ONNX file computing this teacher, which the report times as the latency baseline
    onnx_path: Path | None = None
    #: the teacher's parameter count where known (the report shows it)
    parameter_count: int = 0

    def topk(self, batch: dict[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} serves full logits only")


@dataclass
class LoadedModel:
    """A loaded model with what feeds it (a tokenizer for text models)."""

    model: nn.Module
    tokenizer: Any = None
    description: str = ""
    #: what the teacher measured about itself while loading (an ensemble's per-teacher loyalty, a cache's bytes
    #: per token and fidelity): JSON-serialisable; the report shows it under "teacher_details" / "## Teacher"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """A deployable file written by an exporter or quantizer."""

    path: Path
    kind: str  # e.g. "onnx-fp32", "onnx-int8"
    runtime: str = "onnxruntime"
    parity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: ONNX Runtime execution providers to run it with (the report times and evaluates it with these)
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])

    @property
    def measurable(self) -> bool:
        """Whether the report can run it here: an ONNX file for ONNX Runtime (not, say, a TensorRT plan)."""
        from potstill.runtime import measurable

        return measurable(self.path, self.runtime)


@dataclass
class Context:
    """What a running technique may use. ``record`` collects this stage's report entries."""

    seed: int
    base_dir: Path
    out: Path
    task: "Task"
    spec_hash: str = ""  # hash of the whole resolved spec (exporters write it into artifacts' metadata)
    data: Dataset | None = None
    teacher: LoadedModel | None = None
    stage_dir: Path | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    pending_onnx_quantizers: list["Quantizer"] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    progress: bool = True
    #: the spec's ``measure`` settings (for techniques that time candidates at the run's batch shape)
    measure: Any = None

    @property
    def tokenizer(self) -> Any:
        """The teacher's tokenizer (students share it), or None for models that take tensors."""
        return self.teacher.tokenizer if self.teacher is not None else None

    def note(self, text: str) -> None:
        """Add a sentence to the report (for example: why a technique cannot make this backend faster)."""
        if text not in self.notes:
            self.notes.append(text)


# --------------------------------------------------------------------------------------------------
# kinds
# --------------------------------------------------------------------------------------------------


class Task(Technique):
    """How batches are made and fed to a model, what gets exported, and how quality is measured."""

    #: the data spec used when a spec has no ``data:`` entry
    default_data: ClassVar[dict[str, Any]] = {}
    #: the name of the metric that summarises quality (higher is better)
    primary_metric: ClassVar[str]
    #: the ``transformers`` Auto class an ``hf`` teacher loads for this task
    hf_auto_class: ClassVar[str] = "AutoModel"

    def collate(self, examples: list[Any], tokenizer: Any = None, pad_to: int | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Tensor], hidden_states: bool = False) -> Outputs:
        raise NotImplementedError

    def export_module(self, model: nn.Module) -> nn.Module:
        """A module whose forward takes the export inputs positionally and returns the task's output."""
        raise NotImplementedError

    def export_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The named inputs of the exported graph for this batch (their order is the forward's)."""
        raise NotImplementedError

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        raise NotImplementedError

    def output_name(self) -> str:
        raise NotImplementedError

    def benchmark_batch(self, data: Dataset, tokenizer: Any, batch_size: int, seq_len: int) -> dict[str, Tensor]:
        """A batch of the latency-measurement shape, built from held-out data."""
        raise NotImplementedError

    def evaluate(self, reference: Callable[[dict[str, Tensor]], Tensor], candidate: Callable[[dict[str, Tensor]], Tensor],
                 batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Quality of ``candidate`` against ``reference`` (the teacher) on held-out batches.

        Both callables take a batch and return the task's output tensor.
        """
        raise NotImplementedError


class Data(Technique):
    """Produces or selects the examples a run trains and evaluates on."""

    def load(self, ctx: Context) -> Dataset:
        raise NotImplementedError


class Teacher(Technique):
    """Loads the model whose behaviour the student learns.

    A teacher whose model holds no local weights (an :class:`ExternalTeacher`: ONNX Runtime, an HTTP endpoint,
    an on-disk cache, an ensemble) sets ``local_weights = False``: the pipeline then neither copies nor exports
    it, and the spec must start with a student stage that builds the student on its own (``uses_teacher_weights
    = False``, for example ``- student: {name: hf, path: ...}``).
    """

    local_weights: ClassVar[bool] = True

    def load(self, ctx: Context) -> LoadedModel:
        raise NotImplementedError


class Student(Technique):
    """Builds (or searches) a student architecture, usually inheriting the teacher's weights."""

    #: False for students built without the teacher's weights (usable with an external teacher)
    uses_teacher_weights: ClassVar[bool] = True

    def build(self, teacher: nn.Module, ctx: Context) -> nn.Module:
        """Return a new module; must not modify ``teacher``. Called again, deterministically, on resume."""
        raise NotImplementedError


class Loss(Technique, nn.Module):
    """A distillation objective. Subclass ``forward(student, teacher, batch) -> scalar``.

    ``capture`` names the intermediate outputs the loss needs, by module path; ``setup`` may create
    trainable parameters (for example a projection between hidden sizes), which are optimized with the
    student.
    """

    Options: ClassVar[type[Options]] = LossOptions
    #: which task outputs the loss reads: any of "logits", "embeddings", "hidden_states"
    needs: ClassVar[tuple[str, ...]] = ()
    #: the tasks the loss works with (empty: any task that produces what it ``needs``); checked at validation
    tasks: ClassVar[tuple[str, ...]] = ()
    #: the current step and the stage's number of steps, set by the distill loop before each step
    step: int = 0
    total_steps: int = 1

    def on_step(self, step: int, total_steps: int) -> None:
        """Called before each training step (losses whose behaviour changes over training read it here)."""
        self.step, self.total_steps = step, total_steps

    def prepare(self, batch: dict[str, Tensor], student: nn.Module, teacher: nn.Module) -> dict[str, Tensor]:
        """Replace the step's batch before both models see it (for example with sequences the student
        generates, for on-policy distillation). Called in the order of the stage's losses."""
        return batch

    def student_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """A different input for the student only (for example masked tokens), or None. At most one loss of
        a stage may return one."""
        return None

    def capture(self, model: nn.Module, role: Literal["student", "teacher"]) -> dict[str, str]:
        """``{key: module path}`` of intermediate outputs to capture from ``model``."""
        return {}

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        """Called once before training with both models."""

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        raise NotImplementedError


class Pruner(Technique):
    """Removes weights, structures, experts or tokens. Report entries go in ``ctx.record``."""

    def prune(self, model: nn.Module, ctx: Context) -> nn.Module:
        raise NotImplementedError

    def reshape(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Rebuild the shapes this pruner removed (heads, channels, experts) in a fresh copy of its input, so
        that the stage's cached weights load into it; called before :meth:`restore` when the stage is reused."""
        return model

    def restore(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Re-establish structure (and masks) when this stage's weights are reloaded from the cache."""
        return model


class Quantizer(Technique):
    """Lowers precision. ``target`` says whether it rewrites the torch model or the exported ONNX file."""

    target: ClassVar[Literal["torch", "onnx"]] = "onnx"

    def quantize_torch(self, model: nn.Module, ctx: Context) -> nn.Module:
        raise NotImplementedError

    def quantize_onnx(self, source: Path, destination: Path, ctx: Context) -> Artifact:
        raise NotImplementedError


class Decoder(Technique):
    """Makes inference of a generative model faster (speculative, early exit, Jacobi, ...)."""

    def generate(self, target: nn.Module, input_ids: Tensor, ctx: Context, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def run(self, target: nn.Module, student: nn.Module, ctx: Context) -> dict[str, Any]:
        """The ``decode`` stage: decode held-out prompts with ``target`` (the spec's teacher), helped by
        ``student`` (the pipeline's current model) where the technique uses a second model, and return the
        measurements (speed against the baseline decoder, agreement) for the report."""
        raise NotImplementedError


class Exporter(Technique):
    """Writes deployable artifacts and checks each against PyTorch before returning it."""

    def export(self, model: nn.Module, ctx: Context) -> list[Artifact]:
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())
