"""Conformance tests generated from the registries: every registered technique of every kind is tested
the moment it exists (the timm idea).

For each technique: (a) ``Options()`` validates when no field is required (otherwise it fails on exactly
the required fields), (b) the YAML example in its module docstring validates against ``cls.Options``
(files it names are created in the spec folder; nothing but a file-not-found error on a path field is
tolerated before they exist), (c) it runs on a tiny model on CPU through the runner of its kind. A kind
without a runner fails here, so nobody can add an untested kind silently.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from potstill.capture import capture
from potstill.plugin_manager import get_plugins
from potstill.registry import KINDS
from potstill.techniques import (Artifact, Context, Dataset, LoadedModel, Loss, Outputs, Pruner, Quantizer, Student,
                                 _existing_path)

REGISTRIES = get_plugins().registries
CASES = [pytest.param(kind, entry.name, id=f"{kind}-{entry.name}") for kind, registry in REGISTRIES.items() for entry in registry]


def technique_class(kind: str, name: str) -> type:
    return REGISTRIES[kind].get(name)


# --------------------------------------------------------------------------------------------------
# the docstring example
# --------------------------------------------------------------------------------------------------


def docstring_example(cls: type) -> dict[str, Any]:
    """The flow mapping after ``YAML:`` in the technique's module docstring (a leading ``- `` dropped)."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith("YAML:")]
    assert len(lines) == 1, f"{cls.__module__}: its docstring needs exactly one line starting with 'YAML:'"
    text = lines[0][len("YAML:"):].strip()
    if text.startswith("- "):
        text = text[2:].strip()
    assert text.startswith("{") and text.endswith("}"), f"{cls.__module__}: the YAML example is not a flow mapping: {text}"
    example = yaml.safe_load(text)
    assert isinstance(example, dict) and example.get("name") == cls.name, \
        f"{cls.__module__}: example names {example.get('name')!r}, not {cls.name!r}"
    return {k: v for k, v in example.items() if k != "name"}


def _is_existing_path(annotation: Any) -> bool:
    """Whether a field's type is (or contains) :data:`potstill.techniques.ExistingPath`."""
    for meta in getattr(annotation, "__metadata__", ()):
        if getattr(meta, "func", None) is _existing_path:
            return True
    return any(_is_existing_path(arg) for arg in typing.get_args(annotation))


def path_fields(cls: type) -> set[str]:
    return {name for name, info in cls.Options.model_fields.items()
            if _is_existing_path(info.annotation) or any(getattr(m, "func", None) is _existing_path for m in info.metadata)}


#: files a docstring example names, written into the spec folder so the example is literally runnable;
#: keyed by (kind, name, option). The default is an empty file.
def _torch_teacher_weights(folder: Path) -> None:
    (folder / "my_models.py").write_text(
        "import torch.nn as nn\n\n"
        "def build_mlp(hidden=128):\n"
        "    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n"
    )
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "teacher.safetensors"))


def _corpus(folder: Path, relative: str) -> None:
    from potstill.plugins.data.text_lines import bundled_sentences

    (folder / relative).write_text("\n".join(bundled_sentences()[:400]) + "\n", encoding="utf-8")


def _tiny_bert_weights(folder: Path, relative: str) -> None:
    """Another tiny BERT's weights (the conformance World's shapes), e.g. the base model of a delta pruner."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    save_file({k: v.contiguous() for k, v in BertModel(config).state_dict().items()}, str(folder / relative))


MATERIALS: dict[tuple[str, str, str], Callable[[Path, str], None]] = {
    ("pruner", "dare", "base"): _tiny_bert_weights,
    ("teacher", "torch", "weights"): lambda folder, relative: _torch_teacher_weights(folder),
    ("data", "text_lines", "path"): _corpus,
}


def validated_example(kind: str, cls: type, folder: Path) -> Any:
    """The docstring example validated in ``folder`` (the spec's folder), after writing the files it names.

    Before the files exist, the only acceptable errors are file-not-found errors on path fields.
    """
    example = docstring_example(cls)
    try:
        return cls.Options.model_validate(example, context={"base_dir": folder})
    except ValidationError as exc:
        paths = path_fields(cls)
        for error in exc.errors():
            field = error["loc"][0] if error["loc"] else None
            assert field in paths and "file not found" in error["msg"], (
                f"{kind} {cls.name}: docstring example fails on {error['loc']}: {error['msg']}")
            make = MATERIALS.get((kind, cls.name, str(field)))
            relative = str(example[field])
            if make is not None:
                make(folder, relative)
            else:
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).touch()
    return cls.Options.model_validate(example, context={"base_dir": folder})


def required_fields(cls: type) -> set[str]:
    return {name for name, info in cls.Options.model_fields.items() if info.is_required()}


def run_options(kind: str, cls: type, folder: Path) -> Any:
    """The options a runner uses: the defaults when there are any, else the docstring example."""
    return cls.Options() if not required_fields(cls) else validated_example(kind, cls, folder)


# --------------------------------------------------------------------------------------------------
# (a) and (b)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,name", CASES)
def test_default_options(kind, name):
    cls = technique_class(kind, name)
    assert cls.Options.model_config.get("extra") == "forbid", f"{kind} {name}: Options must forbid unknown keys"
    required = required_fields(cls)
    if not required:
        cls.Options()
        return
    with pytest.raises(ValidationError) as info:
        cls.Options()
    # it fails on exactly the required fields, each reported missing
    assert {e["loc"][0] for e in info.value.errors()} == required
    assert {e["type"] for e in info.value.errors()} == {"missing"}


@pytest.mark.parametrize("kind,name", CASES)
def test_docstring_example_validates(kind, name, tmp_path):
    cls = technique_class(kind, name)
    options = validated_example(kind, cls, tmp_path)
    # the example round-trips: what it sets is what the options hold (paths are resolved, so skip them)
    example = docstring_example(cls)
    for key, value in example.items():
        if key in path_fields(cls):
            assert Path(getattr(options, key)).is_file()
            continue
        held = getattr(options, key)
        assert held == value or (isinstance(held, tuple) and list(held) == value), f"{key}: {held!r} != {value!r}"
    with pytest.raises(ValidationError, match="extra"):
        cls.Options.model_validate({**example, "no_such_option_xyz": 1}, context={"base_dir": tmp_path})


# --------------------------------------------------------------------------------------------------
# (c) runners, one per kind
# --------------------------------------------------------------------------------------------------


def _registry_instance(kind: str, name: str, **options: Any) -> Any:
    return REGISTRIES[kind].get(name)(**options)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from potstill.plugins.data.text_lines import bundled_sentences

    return list(bundled_sentences()[:64])


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return _registry_instance("data", "sklearn_digits").load(None)


def _mlp(inputs: int = 64, hidden: int = 32, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()


class World:
    """Tiny models and data for the runners: a tiny BERT with MiniLM's tokenizer on bundled sentences, and
    an MLP on sklearn's digits."""

    def __init__(self, tiny_bert, tiny_gpt2, tokenizer, sentences, digits, folder: Path):
        self.tiny_bert, self.tokenizer, self.sentences, self.digits, self.folder = tiny_bert, tokenizer, sentences, digits, folder
        self.tiny_gpt2 = tiny_gpt2

    def causal(self, model: nn.Module | None = None) -> Context:
        """A byte-level causal LM (tiny GPT-2) on bundled sentences."""
        task = _registry_instance("task", "causal_lm", max_length=24)
        teacher = LoadedModel(model=model if model is not None else self.tiny_gpt2())
        return Context(seed=0, base_dir=self.folder, out=self.folder / "out", task=task,
                       data=Dataset(train=self.sentences[16:], heldout=self.sentences[:16]), teacher=teacher, progress=False)

    def text(self, model: nn.Module | None = None) -> Context:
        task = _registry_instance("task", "sentence_embedding", max_length=32)
        teacher = LoadedModel(model=model if model is not None else self.tiny_bert(), tokenizer=self.tokenizer)
        return Context(seed=0, base_dir=self.folder, out=self.folder / "out", task=task,
                       data=Dataset(train=self.sentences[16:], heldout=self.sentences[:16]), teacher=teacher, progress=False)

    def tabular(self, model: nn.Module | None = None) -> Context:
        task = _registry_instance("task", "classification")
        teacher = LoadedModel(model=model if model is not None else _mlp())
        return Context(seed=0, base_dir=self.folder, out=self.folder / "out", task=task, data=self.digits,
                       teacher=teacher, progress=False)

    def masked_diffusion(self, model: nn.Module | None = None) -> Context:
        """A tiny random masked-diffusion LM on potstill's synthetic digit problems."""
        from potstill.plugins.decoders._mdlm import tiny_random_mdlm

        task = _registry_instance("task", "masked_diffusion")
        data = _registry_instance("data", "mdlm_problems", train=32, heldout=8).load(None)
        teacher = LoadedModel(model=model if model is not None else tiny_random_mdlm())
        return Context(seed=0, base_dir=self.folder, out=self.folder / "out", task=task, data=data, teacher=teacher,
                       progress=False)

    def diffusion_2d(self, model: nn.Module | None = None) -> Context:
        """A tiny random 2-D class-conditional denoiser on points of its mixture."""
        from potstill.plugins.decoders._diffusion import tiny_random_teacher

        task = _registry_instance("task", "diffusion_2d")
        data = _registry_instance("data", "diffusion_2d_points", train=32, heldout=8).load(None)
        teacher = LoadedModel(model=model if model is not None else tiny_random_teacher())
        return Context(seed=0, base_dir=self.folder, out=self.folder / "out", task=task, data=data, teacher=teacher,
                       progress=False)

    def context_for(self, examples: list[Any], model: nn.Module | None = None) -> Context:
        """The world whose examples look like ``examples`` (strings: text; (features, label): tabular;
        (prompt tokens, answer tokens): masked diffusion; (point, class, index): 2-D diffusion)."""
        if all(isinstance(e, str) for e in examples):
            return self.text(model)
        if all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], torch.Tensor) and not e[0].is_floating_point()
               for e in examples):
            return self.masked_diffusion(model)
        if all(isinstance(e, tuple) and len(e) == 3 and isinstance(e[0], torch.Tensor) and e[0].shape == (2,)
               for e in examples):
            return self.diffusion_2d(model)
        if all(isinstance(e, tuple) and len(e) == 2 for e in examples):
            return self.tabular(model)
        raise AssertionError(f"no tiny model for examples like {examples[0]!r}: add one to the conformance World")


@pytest.fixture
def world(tiny_bert, tiny_gpt2, tokenizer, sentences, digits, tmp_path) -> World:
    return World(tiny_bert, tiny_gpt2, tokenizer, sentences, digits, tmp_path)


def run_task(technique, world: World) -> None:
    data_cls = REGISTRIES["data"].get(technique.default_data["name"])
    data = data_cls(**{k: v for k, v in technique.default_data.items() if k != "name"})
    examples = data.load(world.text()).heldout[:6]  # the task's own default data
    ctx = world.causal() if technique.hf_auto_class == "AutoModelForCausalLM" else world.context_for(examples)
    ctx.task = technique
    model, tokenizer = ctx.teacher.model, ctx.teacher.tokenizer
    batch = technique.collate(examples, tokenizer)
    assert all(isinstance(v, torch.Tensor) and len(v) == len(examples) for v in batch.values())
    with torch.no_grad():
        outputs = technique.forward(model, batch)
        assert isinstance(outputs, Outputs)
        exported = technique.export_module(model).eval()(*technique.export_inputs(batch).values())
    produced = outputs.embeddings if outputs.embeddings is not None else outputs.logits
    assert produced is not None and len(produced) == len(examples)
    torch.testing.assert_close(exported, produced)  # what is exported is what the task measures
    assert set(technique.dynamic_axes()) <= set(technique.export_inputs(batch))
    assert isinstance(technique.output_name(), str)
    bench = technique.benchmark_batch(ctx.data, tokenizer, batch_size=3, seq_len=12)
    assert all(len(v) == 3 for v in bench.values())
    with torch.no_grad():
        metrics = technique.evaluate(lambda b: technique.export_module(model)(*technique.export_inputs(b).values()),
                                     lambda b: technique.export_module(model)(*technique.export_inputs(b).values()), [batch])
    assert technique.primary_metric in metrics and all(isinstance(v, float) for v in metrics.values())


def run_data(technique, world: World) -> None:
    dataset = technique.load(world.text())
    assert isinstance(dataset, Dataset) and dataset.train and dataset.heldout
    ctx = world.context_for(dataset.heldout[:4])
    # some task whose default data this is must batch it
    tasks = [e.cls() for e in REGISTRIES["task"] if e.cls.default_data.get("name") == technique.name] or \
        [e.cls() for e in REGISTRIES["task"]]
    errors = []
    for task in tasks:
        try:
            batch = task.collate(dataset.heldout[:4], ctx.teacher.tokenizer)
            task.forward(ctx.teacher.model, batch)
            return
        except Exception as exc:  # noqa: BLE001 - collect and report below
            errors.append(f"{task.name}: {exc}")
    raise AssertionError(f"no task batches data {technique.name!r}: {errors}")


def run_teacher(technique, world: World) -> None:
    check = getattr(technique, "conformance_check", None)
    if check is not None:  # a teacher that needs a live service (an HTTP endpoint) brings it up itself
        check(world.tiny_gpt2(), world.causal)
        return
    loaded = technique.load(world.text())
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, nn.Module)
    assert not loaded.model.training, "a teacher is returned in eval mode"
    ctx = world.text(loaded.model) if loaded.tokenizer is not None else world.tabular(loaded.model)
    examples = ctx.data.heldout[:3]
    with torch.no_grad():
        outputs = ctx.task.forward(loaded.model, ctx.task.collate(examples, loaded.tokenizer))
    produced = outputs.embeddings if outputs.embeddings is not None else outputs.logits
    assert produced is not None and produced.shape[0] == 3 and torch.isfinite(produced).all()


def _tiny_llama(layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> nn.Module:
    """A random byte-level Llama with grouped-query attention (vocabulary 256: the causal_lm task's bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def run_student(technique: Student, world: World) -> None:
    # a conversion that needs a decoder teacher says which with `conformance_world` ("llama", "causal_lm")
    kind = getattr(technique, "conformance_world", "text")
    if kind == "llama":
        teacher, context = _tiny_llama(), world.causal
    elif kind == "causal_lm":
        teacher, context = world.tiny_gpt2(layers=2), world.causal
    else:
        teacher, context = world.tiny_bert(layers=6), world.text
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = technique.build(teacher, context(teacher))
    assert isinstance(student, nn.Module) and student is not teacher
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "build modified the teacher"
    ctx = context(teacher)
    batch = ctx.task.collate(ctx.data.heldout[:4], ctx.teacher.tokenizer)
    with torch.no_grad():
        student_out = ctx.task.forward(student.eval(), batch)
        teacher_out = ctx.task.forward(teacher, batch)
    produced = student_out.embeddings if student_out.embeddings is not None else student_out.logits
    reference = teacher_out.embeddings if teacher_out.embeddings is not None else teacher_out.logits
    assert produced is not None and produced.shape[0] == reference.shape[0] and torch.isfinite(produced).all()


def run_loss(technique: Loss, world: World) -> None:
    if "causal_lm" in technique.tasks:
        # a bigger teacher and a smaller student, both byte-level GPT-2
        teacher, student = world.tiny_gpt2(hidden=32, layers=2, seed=1), world.tiny_gpt2(hidden=16, layers=1, seed=2).train()
        ctx = world.causal(teacher)
    elif "logits" in technique.needs:
        teacher, student = _mlp(hidden=48, seed=1), _mlp(hidden=16, seed=2).train()
        ctx = world.tabular(teacher)
    else:
        # same hidden size (embeddings are compared directly), fewer layers, other weights
        teacher, student = world.tiny_bert(layers=4, seed=1), world.tiny_bert(layers=2, seed=2).train()
        ctx = world.text(teacher)
    technique.setup(student, teacher)
    paths = {role: technique.capture(model, role) for role, model in (("student", student), ("teacher", teacher))}
    batch = ctx.task.collate(ctx.data.heldout[:6], ctx.teacher.tokenizer)
    technique.on_step(0, 10)
    batch = technique.prepare(batch, student, teacher)
    student_batch = technique.student_batch(batch)
    hidden = "hidden_states" in technique.needs

    def forward(model, role):
        with capture(model, paths[role]) as captured:
            outputs = ctx.task.forward(model, batch, hidden_states=hidden)
        outputs.features = dict(captured)
        return outputs

    def forward_on(model, other_batch):
        with capture(model, paths["student"]) as captured:
            outputs = ctx.task.forward(model, other_batch, hidden_states=hidden)
        outputs.features = dict(captured)
        return outputs

    with torch.no_grad():
        teacher_out = forward(teacher, "teacher")
    value = technique(forward(student, "student") if student_batch is None else forward_on(student, student_batch),
                      teacher_out, batch)
    assert value.dim() == 0 and torch.isfinite(value) and float(value.detach()) > 0, f"{technique.name}: {value}"
    value.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads), f"{technique.name} gives the student no gradient"
    assert not any(p.grad is not None for p in teacher.parameters()), "gradient reached the teacher"


def _tiny_moe() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                            num_experts_per_tok=2, max_position_embeddings=128)).eval()


def run_moe_pruner(technique: Pruner, world: World) -> None:
    """Expert pruners: on a tiny byte-level Mixtral; fewer parameters, and restore rebuilds the same model."""
    model = _tiny_moe()
    ctx = world.causal(model)
    ctx.stage_dir = world.folder / "stage"
    before = sum(p.numel() for p in model.parameters())
    pruned = technique.prune(copy.deepcopy(model), ctx)
    assert sum(p.numel() for p in pruned.parameters()) < before, f"{technique.name} removed nothing"
    restored = technique.restore(copy.deepcopy(pruned), ctx)
    batch = ctx.task.collate(ctx.data.heldout[:3], None)
    with torch.no_grad():
        torch.testing.assert_close(ctx.task.forward(restored, batch).logits, ctx.task.forward(pruned, batch).logits)


def run_prompt_pruner(technique: Pruner, world: World) -> None:
    """Input-side pruners: the model's weights stay; the prompts get shorter; restore compresses the same way."""
    model = world.tiny_bert()
    ctx = world.text(model)
    ctx.stage_dir = world.folder / "stage"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    returned = technique.prune(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in returned.state_dict().items()), f"{technique.name} changed weights"
    texts = ctx.data.heldout[:4]
    compressed = technique.compress(texts)
    assert sum(len(t.split()) for t in compressed) < sum(len(t.split()) for t in texts), f"{technique.name} removed nothing"
    fresh = type(technique)(technique.options)
    fresh.restore(model, ctx)
    assert fresh.compress(texts) == compressed


def run_pruner(technique: Pruner, world: World) -> None:
    # pruners of other model families say which tiny world they need
    world_kind = getattr(technique, "conformance_world", None)
    if world_kind == "moe_causal_lm":
        return run_moe_pruner(technique, world)
    if world_kind == "prompt":
        return run_prompt_pruner(technique, world)
    model = world.tiny_bert()
    ctx = world.text(model)
    zeros_before = sum(int((p == 0).sum()) for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = technique.prune(model, ctx)
    zeros_after = sum(int((p == 0).sum()) for p in pruned.parameters())
    after = pruned.state_dict()
    # zeros (sparsity), fewer parameters (structure), or changed weights (a delta pruner such as dare)
    changed = after.keys() == before.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert zeros_after > zeros_before or changed or sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in world.tiny_bert().parameters()), f"{technique.name} removed nothing"
    restored = technique.restore(copy.deepcopy(pruned), ctx)
    batch = ctx.task.collate(ctx.data.heldout[:3], world.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(ctx.task.forward(restored, batch).embeddings, ctx.task.forward(pruned, batch).embeddings)


def run_quantizer(technique: Quantizer, world: World) -> None:
    model = world.tiny_bert()
    ctx = world.text(model)
    batch = ctx.task.collate(ctx.data.heldout[:3], world.tokenizer)
    with torch.no_grad():
        reference = ctx.task.forward(model, batch).embeddings
    if technique.target == "torch":
        quantized = technique.quantize_torch(copy.deepcopy(model), ctx)
        with torch.no_grad():
            candidate = ctx.task.forward(quantized, batch).embeddings
    else:
        from potstill.exporters.onnx import export_onnx
        from potstill.runtime import ort_callable, session

        source = export_onnx(model, ctx.task, ctx.task.collate(ctx.data.heldout[:2], world.tokenizer, pad_to=16),
                             world.folder / "model.onnx")
        artifact = technique.quantize_onnx(source, world.folder / "model.q.onnx", ctx)
        assert isinstance(artifact, Artifact) and artifact.path.is_file()
        candidate = ort_callable(session(artifact.path))(batch)
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    assert cosine.min() > 0.9, f"{technique.name}: cosine to fp32 {cosine.tolist()}"


def run_exporter(technique, world: World) -> None:
    model = world.tiny_bert()
    artifacts = technique.export(model, world.text(model))
    assert artifacts and all(isinstance(a, Artifact) and Path(a.path).exists() for a in artifacts)


def run_decoder(technique, world: World) -> None:
    if getattr(technique, "model_kind", "causal") == "continuous_diffusion":
        # few-step samplers of a 2-D diffusion model: class labels in, samples [N, 2] out (fit on a tiny budget)
        from potstill.plugins.decoders._diffusion import conformance_check

        conformance_check(technique)
        return
    if getattr(technique, "model_kind", "causal") == "mdlm":
        # masked-diffusion decoders run on a tiny random bidirectional MDLM, not a causal GPT-2
        from potstill.plugins.decoders._mdlm import tiny_random_mdlm

        target = tiny_random_mdlm()
        prompt = torch.randint(0, 10, (1, 5))  # digits only: never the mask token
        with torch.no_grad():
            out = technique.generate(target, prompt, world.causal(target), max_new_tokens=4)
        assert out.dim() == 2 and torch.equal(out[:, :5], prompt) and out.shape[1] == 9
        assert not (out == target.mask_id).any()
        return
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    target = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    draft = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    prompt = torch.randint(0, 128, (1, 5))
    # `draft`: the second model of decoders that use one (speculative drafts, r2r's small model); others ignore it
    out = technique.generate(target, prompt, world.causal(target), max_new_tokens=4, draft=draft)
    assert out.dim() == 2 and torch.equal(out[:, :5], prompt) and out.shape[1] > 5


RUNNERS: dict[str, Callable[[Any, World], None]] = {
    "task": run_task,
    "data": run_data,
    "teacher": run_teacher,
    "student": run_student,
    "loss": run_loss,
    "pruner": run_pruner,
    "quantizer": run_quantizer,
    "decoder": run_decoder,
    "exporter": run_exporter,
}


@pytest.mark.parametrize("kind", sorted(set(KINDS) | set(REGISTRIES)))
def test_every_kind_has_a_runner(kind):
    assert kind in RUNNERS, f"kind {kind!r} has no conformance runner: add one to tests/test_conformance.py"


@pytest.mark.parametrize("kind,name", CASES)
def test_runs_on_a_tiny_model(kind, name, world, tmp_path):
    runner = RUNNERS.get(kind)
    assert runner is not None, f"kind {kind!r} has no conformance runner: add one to tests/test_conformance.py"
    cls = technique_class(kind, name)
    cls.check_dependencies()
    runner(cls(run_options(kind, cls, tmp_path)), world)


def test_decoder_runner_accepts_a_plain_greedy_decoder(world):
    """No built-in decoder exists yet; make sure the decoder runner itself works (and can fail)."""
    from potstill.techniques import Decoder

    class Greedy(Decoder):
        name = "greedy_for_test"

        def generate(self, target, input_ids, ctx, max_new_tokens=4, **kwargs):
            ids = input_ids
            for _ in range(max_new_tokens):
                next_id = target(ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_id], dim=1)
            return ids

    class DropsPrompt(Greedy):
        def generate(self, target, input_ids, ctx, max_new_tokens=4, **kwargs):
            return super().generate(target, input_ids, ctx, max_new_tokens)[:, input_ids.shape[1]:]

    with torch.no_grad():
        run_decoder(Greedy(), world)
        with pytest.raises(AssertionError):
            run_decoder(DropsPrompt(), world)


def test_examples_name_their_technique():
    """Every module that registers a technique states its paper or purpose first, then its YAML example."""
    for kind, registry in REGISTRIES.items():
        for entry in registry:
            doc = inspect.getdoc(sys.modules[entry.cls.__module__]) or ""
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            assert first and not first.startswith("YAML:"), f"{kind} {entry.name}: module docstring needs a summary line"
            assert re.search(r"^YAML:", doc, re.M), f"{kind} {entry.name}: module docstring needs a 'YAML:' example"
