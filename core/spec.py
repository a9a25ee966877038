"""The pipeline spec: YAML read with a safe loader, validated whole before any model loads.

Shape (see ``examples/minilm_l3.yaml``)::

    potstill: 1
    name: minilm-l3-int8
    seed: 0
    task: {name: sentence_embedding}
    data: {name: text_lines}               # omitted -> the task's bundled default
    teacher: {name: hf, path: "bundled:minilm"}
    stages:
      - student: {name: layer_drop, keep: [1, 3, 5]}
      - distill: {steps: 400, losses: [{name: embedding_cosine}]}
      - prune: {name: magnitude, sparsity: 0.3}
      - quantize: {name: ort_int8_dynamic}
      - export: {name: onnx}

Every problem is reported at once as ``<yaml path>: <message>`` (for example
``stages[1].distill.losses[0].name: unknown loss 'kd2'; did you mean 'kd'?``), raised as one
:class:`~potstill.errors.SpecError`. A spec is data: the loader refuses YAML tags.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from potstill.errors import SpecError
from potstill.plugin_manager import Plugins, get_plugins
from potstill.techniques import Loss, Options, Technique

SPEC_VERSION = 1

#: stage key -> technique kind (``distill`` holds a list of losses instead of one technique)
STAGE_KINDS: dict[str, str] = {
    "student": "student",
    "distill": "loss",
    "prune": "pruner",
    "quantize": "quantizer",
    "export": "exporter",
    "decode": "decoder",
}


class OptimizerOptions(Options):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear"] = "linear"  # linear decay to 0 after warm-up
    max_grad_norm: float | None = Field(1.0, gt=0)


class DistillOptions(Options):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(32, gt=0)
    optimizer: OptimizerOptions = OptimizerOptions()
    checkpoint_every: int = Field(50, gt=0, description="steps between resumable checkpoints")
    dropout: bool = Field(False, description="train with the model's dropout on")
    losses: list[dict[str, Any]] = Field(min_length=1)
    #: this stage's own teacher and data (multi-stage recipes: general then task distillation); default: the spec's
    teacher: dict[str, Any] | None = None
    data: dict[str, Any] | None = None


class MeasureOptions(Options):
    """How latency is measured (ONNX Runtime, CPU) and how much held-out data quality uses."""

    batch_size: int = Field(8, gt=0)
    seq_len: int = Field(64, gt=0)
    threads: int = Field(1, gt=0)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, gt=0)
    heldout_batches: int | None = Field(None, gt=0, description="quality on this many held-out batches; default: all")
    latency: bool = Field(True, description="measure latency (false: quality and size only)")


class TopLevel(Options):
    potstill: Literal[1]
    name: str = "potstill-run"
    seed: int = 0
    task: dict[str, Any]
    data: dict[str, Any] | None = None
    teacher: dict[str, Any]
    stages: list[dict[str, Any]] = []
    measure: MeasureOptions = MeasureOptions()
    threads: int | None = Field(None, gt=0, description="torch threads while training (default: torch's own); "
                                "1 is steadier on a busy machine. Latency is always timed with measure.threads")


@dataclass
class Stage:
    index: int
    key: str  # student | distill | prune | quantize | export | decode
    kind: str  # technique kind
    technique: Technique | None = None  # None for distill
    distill: DistillOptions | None = None
    losses: list[Loss] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    #: a distill stage's own teacher and data, when it names them
    teacher: Technique | None = None
    data: Technique | None = None

    @property
    def name(self) -> str:
        """The technique's name; for a distill stage, its losses' names joined by '+'."""
        return self.technique.name if self.technique is not None else "+".join(l.name for l in self.losses)

    @property
    def label(self) -> str:
        return f"{self.key}:{self.name}"

    @property
    def dirname(self) -> str:
        return f"{self.index}-{self.key}"


@dataclass
class Spec:
    """A validated spec with its techniques constructed."""

    raw: dict[str, Any]
    top: TopLevel
    task: Technique
    data: Technique
    teacher: Technique
    stages: list[Stage]
    base_dir: Path
    source: str | None = None

    @property
    def name(self) -> str:
        return self.top.name

    @property
    def seed(self) -> int:
        return self.top.seed

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in (what the bundle's spec.yaml holds)."""
        def entry(technique: Technique) -> dict[str, Any]:
            return {"name": technique.name, **technique.options.model_dump(mode="json")}

        stages: list[dict[str, Any]] = []
        for stage in self.stages:
            if stage.key == "distill":
                assert stage.distill is not None
                body = stage.distill.model_dump(mode="json")
                body["losses"] = [entry(loss) for loss in stage.losses]
                for key in ("teacher", "data"):
                    own = getattr(stage, key)
                    if own is None:
                        body.pop(key)
                    else:
                        body[key] = entry(own)
            else:
                assert stage.technique is not None
                body = entry(stage.technique)
            stages.append({stage.key: body})
        return {
            "potstill": SPEC_VERSION,
            "name": self.top.name,
            "seed": self.top.seed,
            "task": entry(self.task),
            "data": entry(self.data),
            "teacher": entry(self.teacher),
            "stages": stages,
            "measure": self.top.measure.model_dump(mode="json"),
            "threads": self.top.threads,
        }

    def prefix_hash(self, upto: int) -> str:
        """Hash of everything that determines the output of stages ``0..upto`` (inclusive)."""
        resolved = self.resolved()
        material = {
            "seed": resolved["seed"],
            "task": resolved["task"],
            "data": [resolved["data"], self.data.fingerprint()],
            "teacher": [resolved["teacher"], self.teacher.fingerprint()],
            "stages": resolved["stages"][: upto + 1],
            # a stage's own teacher or data changes what it computes when its files change
            "stage_inputs": [own.fingerprint() for stage in self.stages[: upto + 1]
                             for own in (stage.teacher, stage.data) if own is not None],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """The safe loader; tags such as ``!!python/object`` are rejected with a clear message."""


def _reject_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"tag {node.tag!r} is not allowed: a spec is data, not code", node.start_mark
    )


_SafeLoader.add_multi_constructor("!", _reject_tag)
_SafeLoader.add_multi_constructor("tag:yaml.org,2002:python/", _reject_tag)


def read_yaml(text: str, source: str | None = None) -> Any:
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([(where, f"not valid YAML: {problem}")], source) from None


_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(-?\d+)\]|\.")


def parse_path(path: str) -> list[str | int]:
    """``stages[1].distill.steps`` -> ``['stages', 1, 'distill', 'steps']``."""
    parts: list[str | int] = []
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if not match:
            raise ValueError(f"cannot parse {path!r} at {path[position:]!r}")
        if match.group(1):
            parts.append(match.group(1))
        elif match.group(2) is not None:
            parts.append(int(match.group(2)))
        position = match.end()
    if not parts:
        raise ValueError("empty path")
    return parts


def format_path(parts: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[tuple[str, str]]:
    """Apply ``path=value`` overrides in place; return problems as ``(--set ..., message)``."""
    problems: list[tuple[str, str]] = []
    for override in overrides:
        where = f"--set {override}"
        if "=" not in override:
            problems.append((where, "expected PATH=VALUE, for example stages[1].distill.steps=50"))
            continue
        path_text, value_text = override.split("=", 1)
        try:
            parts = parse_path(path_text.strip())
            value = yaml.load(value_text, Loader=_SafeLoader)  # noqa: S506
        except (ValueError, yaml.YAMLError) as exc:
            problems.append((where, str(exc).splitlines()[0]))
            continue
        node: Any = raw
        try:
            for i, part in enumerate(parts[:-1]):
                if isinstance(part, int):
                    node = node[part]
                else:
                    if not isinstance(node, dict):
                        raise TypeError(format_path(parts[: i + 1]))
                    node = node.setdefault(part, {})
            last = parts[-1]
            if isinstance(last, int):
                node[last] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise TypeError(format_path(parts))
        except (IndexError, KeyError, TypeError) as exc:
            problems.append((where, f"no such place in the spec ({exc.__class__.__name__}: {exc})"))
    return problems


def _messages(exc: ValidationError, prefix: str, model: type[Options] | None = None) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors():
        loc = [prefix] if prefix else []
        loc_parts = list(error["loc"])
        path = format_path(loc + loc_parts) if loc_parts else prefix
        if prefix and loc_parts:
            path = prefix + ("" if isinstance(loc_parts[0], int) else ".") + format_path(loc_parts)
        if error["type"] == "extra_forbidden":
            key = str(loc_parts[-1]) if loc_parts else "?"
            fields = _fields_at(model, loc_parts[:-1]) if model else []
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; known keys: {', '.join(fields)}" if fields else "")
            message = f"unknown key {key!r}{hint}"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "value_error":
            message = str(error["ctx"].get("error", error["msg"])) if error.get("ctx") else error["msg"]
        else:
            message = f"{error['msg']} (got {error.get('input')!r})" if "input" in error and not isinstance(
                error.get("input"), (dict, list)) else error["msg"]
        problems.append((path, message))
    return problems


def _fields_at(model: type[Options] | None, loc: list[Any]) -> list[str]:
    """Field names of the (nested) options model at ``loc``, for did-you-mean on unknown keys."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        info = getattr(current, "model_fields", {}).get(part)
        annotation = getattr(info, "annotation", None)
        current = annotation if isinstance(annotation, type) and issubclass(annotation, Options) else None
    return sorted(getattr(current, "model_fields", {}) or [])


class _Validator:
    def __init__(self, plugins: Plugins, base_dir: Path):
        self.plugins = plugins
        self.base_dir = base_dir
        self.problems: list[tuple[str, str]] = []

    def technique(self, kind: str, value: Any, path: str) -> Technique | None:
        registry = self.plugins.registry(kind)
        if not isinstance(value, dict):
            if not any(where == path for where, _ in self.problems):  # the top-level check may have said so
                self.problems.append((path, f"expected a mapping like {{name: <{kind}>, ...}}, got {type(value).__name__}"))
            return None
        name = value.get("name")
        if name is None:
            self.problems.append((f"{path}.name", f"required: which {kind} (available: {', '.join(registry.names())})"))
            return None
        if name not in registry:
            self.problems.append((f"{path}.name", registry.unknown(name)))
            return None
        cls = registry.get(name)
        body = {k: v for k, v in value.items() if k != "name"}
        ok = True
        for line in cls.missing_dependencies():
            self.problems.append((f"{path}.name", f"{kind} {name!r} {line}"))
            ok = False
        try:
            options = cls.Options.model_validate(body, context={"base_dir": self.base_dir})
        except ValidationError as exc:
            self.problems.extend(_messages(exc, path, cls.Options))
            return None
        return cls(options) if ok else None


def nested_technique(kind: str, value: Any, base_dir: Path | str = ".", plugins: Plugins | None = None) -> Technique:
    """A technique named inside another's options (an ensemble's teachers, a cache's teacher), built and
    validated; every problem is raised as one ``ValueError`` whose message gives the inner YAML path, so a
    pydantic validator can call it and the outer path is added by the spec's error report."""
    check = _Validator(plugins or get_plugins(), Path(base_dir))
    technique = check.technique(kind, value, "")
    if check.problems or technique is None:
        raise ValueError("; ".join(f"{path.lstrip('.')}: {message}" if path else message for path, message in check.problems)
                         or f"not a valid {kind}")
    return technique


def validate(raw: Any, base_dir: Path | str = ".", source: str | None = None, overrides: list[str] | None = None,
             plugins: Plugins | None = None) -> Spec:
    """Validate a parsed spec; raise :class:`SpecError` listing every problem, or return the :class:`Spec`."""
    plugins = plugins or get_plugins()
    base_dir = Path(base_dir).resolve()
    if not isinstance(raw, dict):
        raise SpecError([("", f"a spec is a YAML mapping with `potstill: {SPEC_VERSION}` at the top, got {type(raw).__name__}")], source)
    raw = copy.deepcopy(raw)
    check = _Validator(plugins, base_dir)
    check.problems.extend(apply_overrides(raw, overrides or []))

    top: TopLevel | None = None
    try:
        top = TopLevel.model_validate(raw)
    except ValidationError as exc:
        for path, message in _messages(exc, "", TopLevel):
            if path == "potstill":
                message = f"{message}; this potstill reads spec format `potstill: {SPEC_VERSION}`"
            check.problems.append((path, message))

    task = check.technique("task", raw.get("task"), "task") if "task" in raw else None
    data_raw = raw.get("data")
    if data_raw is None and task is not None:
        data_raw = dict(type(task).default_data)
    data = check.technique("data", data_raw, "data") if data_raw is not None else None
    teacher = check.technique("teacher", raw.get("teacher"), "teacher") if "teacher" in raw else None

    stages: list[Stage] = []
    raw_stages = raw.get("stages") or []
    for index, stage_raw in enumerate(raw_stages if isinstance(raw_stages, list) else []):
        path = f"stages[{index}]"
        if not isinstance(stage_raw, dict) or len(stage_raw) != 1:
            got = f"; got keys: {', '.join(map(str, stage_raw))}" if isinstance(stage_raw, dict) else ""
            check.problems.append((path, f"a stage is a mapping with one key, one of: {', '.join(STAGE_KINDS)}{got}"))
            continue
        key, body = next(iter(stage_raw.items()))
        if key not in STAGE_KINDS:
            close = difflib.get_close_matches(str(key), list(STAGE_KINDS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; stage kinds: {', '.join(STAGE_KINDS)}"
            check.problems.append((f"{path}.{key}", f"unknown stage kind {key!r}{hint}"))
            continue
        stage = Stage(index=index, key=key, kind=STAGE_KINDS[key], raw=stage_raw)
        if key == "distill":
            if not isinstance(body, dict):
                check.problems.append((f"{path}.distill", "expected a mapping with `losses: [...]`"))
                continue
            try:
                stage.distill = DistillOptions.model_validate(body)
            except ValidationError as exc:
                check.problems.extend(_messages(exc, f"{path}.distill", DistillOptions))
            for key in ("teacher", "data"):
                if body.get(key) is not None:
                    setattr(stage, key, check.technique(key, body[key], f"{path}.distill.{key}"))
            losses = body.get("losses") if isinstance(body.get("losses"), list) else []
            for j, loss_raw in enumerate(losses):
                loss = check.technique("loss", loss_raw, f"{path}.distill.losses[{j}]")
                if loss is not None and task is not None and loss.tasks and task.name not in loss.tasks:
                    check.problems.append((f"{path}.distill.losses[{j}].name",
                                           f"loss {loss.name!r} works with task {' or '.join(loss.tasks)}, "
                                           f"not {task.name!r}; change `task:` or pick another loss"))
                if loss is not None:
                    stage.losses.append(loss)  # type: ignore[arg-type]
        else:
            stage.technique = check.technique(stage.kind, body, f"{path}.{key}")
        stages.append(stage)

    check.problems.extend(_cross_stage_problems(raw_stages if isinstance(raw_stages, list) else [], check.plugins))
    if teacher is not None and not type(teacher).local_weights:
        first = stages[0] if stages else None
        builds_own = first is not None and first.key == "student" and first.technique is not None \
            and not type(first.technique).uses_teacher_weights
        if not builds_own and not (first is not None and first.key == "student" and first.technique is None):
            check.problems.append(("stages[0]" if stages else "stages",
                                   f"teacher {teacher.name!r} has no local weights to copy or compress; start with a "
                                   "student stage that builds its own model, e.g. `- student: {name: hf, path: ...}`"))
    if check.problems:
        raise SpecError(check.problems, source)
    assert top is not None and task is not None and data is not None and teacher is not None
    return Spec(raw=raw, top=top, task=task, data=data, teacher=teacher, stages=stages, base_dir=base_dir, source=source)


def _cross_stage_problems(raw_stages: list[Any], plugins: Plugins) -> list[tuple[str, str]]:
    """Problems between stages: an ONNX quantizer with no export to quantize."""
    problems = []
    has_export = any(isinstance(s, dict) and "export" in s for s in raw_stages)
    for index, stage_raw in enumerate(raw_stages):
        if not isinstance(stage_raw, dict) or len(stage_raw) != 1:
            continue
        key, body = next(iter(stage_raw.items()))
        if key == "quantize" and isinstance(body, dict) and body.get("name") in plugins.registry("quantizer"):
            if plugins.registry("quantizer").get(body["name"]).target == "onnx" and not has_export:
                problems.append((f"stages[{index}].quantize", f"{body['name']} quantizes an exported ONNX model; "
                                 "add a stage `- export: {name: onnx}`"))
    return problems


def load(path_or_raw: Any, overrides: list[str] | None = None, plugins: Plugins | None = None) -> Spec:
    """Load and validate a spec from a path, a YAML string or a parsed mapping."""
    if isinstance(path_or_raw, Spec):
        return path_or_raw
    if isinstance(path_or_raw, dict):
        return validate(path_or_raw, Path.cwd(), None, overrides, plugins)
    text_or_path = str(path_or_raw)
    path = Path(text_or_path)
    if "\n" not in text_or_path and (path.suffix in (".yaml", ".yml") or path.exists()):
        if not path.is_file():
            raise SpecError([("", f"spec file not found: {path}")], str(path))
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
        return validate(raw, path.parent, str(path), overrides, plugins)
    return validate(read_yaml(text_or_path), Path.cwd(), None, overrides, plugins)
