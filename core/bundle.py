"""A bundle a deployment engineer takes as it is: reference data, a checkable manifest, ``verify`` and ``bench``.

At the end of a run, :func:`write_reference` stores a few batches of check inputs (at shapes unlike the
export example) with the PyTorch outputs of the student and of the teacher, and decides per artifact what
"still correct" means: an fp32 artifact must stay within its exporter's ``atol`` of PyTorch; a quantized
(or otherwise lowered) one must keep its cosine to the reference above a floor set slightly below what was
measured when the bundle was written. ``manifest.json`` records these with the sha256 of every file, so
that :func:`verify` can re-check a bundle anywhere, after a copy or a move (all paths are relative):

* every hash (a flipped byte or a truncated file names the file);
* every measurable artifact, loaded in ONNX Runtime with its recorded providers, against the stored
  reference outputs;
* the same artifacts on *fresh* inputs: stored rows recombined into batches of new sizes (whose
  reference outputs are known row by row), and random inputs of new shapes (token ids from the vocab, a
  random padding mask), where a quantized artifact is compared with its fp32 sibling.

An artifact that is not measurable here (a TensorRT build plan) is hash-checked and reported as not run.
:func:`bench` times every measurable artifact side by side, interleaved so that machine drift hits them
all alike, and gives medians, p10/p90 and speed-ups against ``teacher.onnx``.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from potstill import io
from potstill.errors import PotstillError
from potstill.runtime import measurable, ort_callable, session

REFERENCE_DIR = "reference"
INPUTS = f"{REFERENCE_DIR}/inputs.safetensors"
OUTPUTS = f"{REFERENCE_DIR}/outputs.safetensors"
MANIFEST = "manifest.json"
TEACHER = "teacher.onnx"
#: (batch, sequence) of the stored check inputs: unlike the export example (2, 16) and the exporter's
#: check shapes, so a graph that baked in a shape fails here too
REFERENCE_SHAPES: list[tuple[int, int]] = [(3, 11), (5, 29), (8, 17)]
#: fresh batches per kind (recombined rows, random inputs) that verify and write_reference build
FRESH_BATCHES = 2
#: ops that compute in (or convert to) 8-bit integers
INT8_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "QEmbedLayerNormalization",
            "DynamicQuantizeLSTM", "QOrderedMatMul"}


class BundleError(PotstillError):
    """The folder is not a bundle (no manifest, unreadable manifest): a user mistake, exit 2."""

    exit_code = 2


# --------------------------------------------------------------------------------------------------
# what an artifact is, read from its ONNX file
# --------------------------------------------------------------------------------------------------


def stem(path: str | Path) -> str:
    """``model.int8.onnx`` -> ``model``: artifacts derived from one export share the part before the first dot."""
    return Path(path).name.split(".")[0]


def fp32_sibling(path: str, kind: str, artifacts: list[tuple[str, str]]) -> str | None:
    """The fp32 artifact a lowered one was made from: same stem, kind ``onnx-fp32`` (else the only fp32 one).

    :param artifacts: ``(path, kind)`` of every artifact in the bundle, teacher excluded.
    """
    if kind == "onnx-fp32":
        return None
    fp32 = [p for p, k in artifacts if k == "onnx-fp32" and p != path]
    same = [p for p in fp32 if stem(p) == stem(path)]
    if same:
        return same[0]
    return fp32[0] if len(fp32) == 1 else None


def onnx_opset(path: str | Path) -> int | None:
    """The default-domain opset the file declares (what a runtime must support to load it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def op_precision(path: str | Path) -> dict[str, int]:
    """Count the graph's ops by the precision they compute in: ``{"int8": n, "fp16": n, "fp32": n}``.

    int8: the integer and (de)quantization ops of ORT's quantizers; fp16: ops touching an fp16/bf16 tensor
    (types from the initializers, the graph's inputs and outputs, and ONNX shape inference where it
    succeeds), or casting to one; everything else counts as fp32 (shape arithmetic included, as the
    question is "where did the precision go", not "where does the time go").
    """
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # contrib ops or a big model: fall back to the types the file states
        pass
    half = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    types: dict[str, int] = {init.name: init.data_type for init in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    counts = {"int8": 0, "fp16": 0, "fp32": 0}

    def visit(graph: Any) -> None:
        for node in graph.node:
            if node.op_type in INT8_OPS or node.op_type.startswith("QLinear"):
                counts["int8"] += 1
            elif any(types.get(name) in half for name in list(node.input) + list(node.output)) or (
                    node.op_type == "Cast" and any(a.name == "to" and a.i in half for a in node.attribute)):
                counts["fp16"] += 1
            else:
                counts["fp32"] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return counts


# --------------------------------------------------------------------------------------------------
# inputs: stored, recombined, random
# --------------------------------------------------------------------------------------------------


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> list[dict[str, torch.Tensor]]:
    """``{"0/input_ids": t, "0/attention_mask": m, "1/...": ...}`` -> ``[{"input_ids": t, ...}, ...]``."""
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        if name.startswith(prefix):
            batches.setdefault(int(index), {})[name[len(prefix):]] = value
    return [batches[i] for i in sorted(batches)]


def _join(batches: list[dict[str, torch.Tensor]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{i}/{prefix}{name}": value for i, batch in enumerate(batches) for name, value in batch.items()}


def _input_axes(sess: Any) -> dict[str, list[str | None]]:
    """Per graph input, per axis: the symbolic name of a dynamic axis, or None for a fixed one."""
    axes = {}
    for value in sess.get_inputs():
        axes[value.name] = [None if isinstance(d, int) else (d or f"axis{i}") for i, d in enumerate(value.shape)]
    return axes


def _is_mask(values: list[torch.Tensor]) -> bool:
    return all(not v.is_floating_point() and bool(((v == 0) | (v == 1)).all()) for v in values)


def recombined_rows(stored: list[dict[str, torch.Tensor]], references: dict[str, list[torch.Tensor]],
                    rng: random.Random, count: int = FRESH_BATCHES
                    ) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """New batches of new sizes made of stored rows drawn again (with repeats, in a new order).

    A row's output depends on that row alone (every task here maps examples independently), so each
    reference output is known row by row: this checks a new batch shape against PyTorch without PyTorch.

    :returns: ``(inputs, {reference name: expected output})`` per batch.
    """
    out = []
    for index in range(count):
        source = index % len(stored)
        size = len(next(iter(stored[source].values())))
        new_size = rng.choice([n for n in range(1, size + 4) if n != size])
        rows = torch.tensor([rng.randrange(size) for _ in range(new_size)])
        batch = {name: value[rows] for name, value in stored[source].items()}
        out.append((batch, {name: outputs[source][rows] for name, outputs in references.items()}))
    return out


def random_inputs(stored: list[dict[str, torch.Tensor]], axes: dict[str, list[str | None]], rng: random.Random,
                  vocab_size: int | None = None, shape: tuple[int, int] | None = None,
                  full_mask: bool = False) -> dict[str, torch.Tensor]:
    """One batch of random inputs, of a shape no stored batch has (or of ``shape`` = (batch, sequence)).

    Integer inputs whose stored values are all 0/1 are masks: right padding of a random length per row
    (at least one real token, as a tokenizer makes). Other integers are token ids, drawn from
    ``[0, vocab_size)`` or, without a vocabulary, from the values the stored batches hold. Floats are
    drawn around the stored values' per-feature mean and spread. The sequence length stays within the
    stored ones, which are known to fit the model's positions.
    """
    seen_batch = {len(next(iter(b.values()))) for b in stored}
    seen_seq = {v.shape[1] for b in stored for v in b.values() if v.dim() > 1}
    if shape is None:
        batch = rng.choice([n for n in range(1, max(seen_batch) + 4) if n not in seen_batch])
        top = max(seen_seq) if seen_seq else 2
        choices = [n for n in range(2, top + 1) if n not in seen_seq] or [top]
        seq = rng.choice(choices)
    else:
        batch, seq = shape
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    sizes: dict[str, int] = {}
    result = {}
    for name, dims in axes.items():
        template = stored[0][name]
        new_shape = []
        for axis, dim in enumerate(dims):
            if dim is None:
                new_shape.append(template.shape[axis])
            else:
                new_shape.append(sizes.setdefault(dim, batch if axis == 0 else seq))
        values = [b[name] for b in stored]
        if template.is_floating_point():
            flat = torch.cat([v.reshape(-1, *v.shape[1:]) for v in values]) if template.dim() <= 2 else None
            if flat is not None and list(flat.shape[1:]) == new_shape[1:]:
                mean, spread = flat.mean(0), flat.std(0).nan_to_num(1.0) + 1e-3
                result[name] = (mean + spread * torch.randn(new_shape, generator=generator)).to(template.dtype)
            else:
                result[name] = torch.randn(new_shape, generator=generator).to(template.dtype)
        elif _is_mask(values):
            length = new_shape[-1]
            keep = torch.ones(new_shape[0], dtype=torch.long) * length if full_mask else \
                torch.randint(1, length + 1, (new_shape[0],), generator=generator)
            mask = (torch.arange(length).expand(*new_shape) < keep.view(-1, *[1] * (len(new_shape) - 1)))
            result[name] = mask.to(template.dtype)
        else:
            if vocab_size:
                ids = torch.randint(0, vocab_size, new_shape, generator=generator)
            else:
                pool = torch.unique(torch.cat([v.flatten() for v in values]))
                ids = pool[torch.randint(0, len(pool), new_shape, generator=generator)]
            result[name] = ids.to(template.dtype)
    return result


def _shape(batch: dict[str, torch.Tensor]) -> str:
    return "x".join(str(s) for s in next(iter(batch.values())).shape[:2])


# --------------------------------------------------------------------------------------------------
# writing (at the end of a run)
# --------------------------------------------------------------------------------------------------


def _cosine_floor(measured: float) -> float:
    """Slightly below the measured worst cosine: room for the noise of new inputs, none for a wrong model."""
    return round(max(0.0, measured - max(0.005, 0.5 * (1.0 - measured))), 6)


def _run(sess: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ort_callable(sess)(batch)


def write_reference(out: Path, ctx: Any, model: nn.Module, teacher: nn.Module, report: Any) -> dict[str, Any] | None:
    """Store the check inputs and PyTorch outputs under ``reference/``; return the manifest's checks.

    Called by the pipeline after the report and before :func:`potstill.report.write_bundle`, which hashes
    these files with the others. Returns None (nothing stored) when the run exported no ONNX artifact.
    Each artifact's tolerance is decided here, from what it measured when it was written: the exporter's
    ``atol`` for fp32 artifacts; for lowered ones a cosine floor below the worst cosine seen at export, on
    the stored inputs and on seeded fresh inputs against the fp32 sibling.
    """
    from potstill.runtime import compare

    entries = [e for e in [report.teacher] + report.artifacts if str(e["path"]).endswith(".onnx")
               and measurable(out / e["path"], e.get("runtime", "onnxruntime"))]
    if not entries:
        return None
    task = ctx.task
    held = ctx.data.heldout
    stored = []
    offset = 0
    for batch_size, seq_len in REFERENCE_SHAPES:
        examples = [held[(offset + i) % len(held)] for i in range(batch_size)]
        offset += batch_size  # other sentences in each batch, not the same first few again
        stored.append({k: v.contiguous() for k, v in task.export_inputs(task.collate(examples, ctx.tokenizer,
                                                                                     pad_to=seq_len)).items()})
    references: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for role, module in (("student", model), ("teacher", teacher)):
            wrapped = task.export_module(module).eval()
            references[role] = [wrapped(*batch.values()).detach().float() for batch in stored]
    io.save_tensors(out / INPUTS, _join(stored), metadata={"what": "check inputs, batch/<input name>"})
    io.save_tensors(out / OUTPUTS, {f"{i}/{role}": t for role, ts in references.items() for i, t in enumerate(ts)},
                    metadata={"what": "PyTorch outputs, batch/<student|teacher>"})

    vocab_size = len(ctx.tokenizer) if ctx.tokenizer is not None and hasattr(ctx.tokenizer, "__len__") else None
    from potstill.exporters.onnx import OnnxExporter

    default_atol = OnnxExporter.Options().atol
    pairs = [(e["path"], e["kind"]) for e in report.artifacts]
    checks: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    rng = random.Random(0)
    for entry in entries:
        path = entry["path"]
        role = "teacher" if path == TEACHER else "student"
        sess = session(out / path, providers=entry.get("providers"))
        outputs[path] = [_run(sess, batch) for batch in stored]
        worst = _worst([compare(r, o) for r, o in zip(references[role], outputs[path])])
        check: dict[str, Any] = {"reference": role}
        if _full_precision(entry):
            atol = float(entry.get("parity", {}).get("atol", default_atol))
            check.update(metric="max_abs_diff", atol=atol, measured=round(worst["max_abs_diff"], 9))
            if worst["max_abs_diff"] > atol:
                report.data["notes"].append(f"{path} differs from PyTorch by {worst['max_abs_diff']:.3g} on the stored "
                                            f"reference inputs (> atol {atol}): `potstill verify` will fail it.")
        else:
            sibling = fp32_sibling(path, entry["kind"], pairs)
            measured = [worst["min_cosine"]]
            if "min_cosine" in entry.get("parity", {}):
                measured.append(float(entry["parity"]["min_cosine"]))
            if sibling is not None:
                sibling_sess = session(out / sibling)
                axes = _input_axes(sibling_sess)
                fresh = [b for b, _ in recombined_rows(stored, {}, rng)]
                fresh += [random_inputs(stored, axes, rng, vocab_size) for _ in range(FRESH_BATCHES)]
                measured += [compare(_run(sibling_sess, b), _run(sess, b))["min_cosine"] for b in fresh]
            check.update(metric="min_cosine", floor=_cosine_floor(min(measured)), measured=round(min(measured), 6),
                         sibling=sibling)
        checks[path] = check
    return {"inputs": INPUTS, "outputs": OUTPUTS, "shapes": [list(s) for s in REFERENCE_SHAPES],
            "vocab_size": vocab_size, "checks": checks}


def _full_precision(entry: dict[str, Any]) -> bool:
    """Whether an artifact should match PyTorch to an absolute tolerance (fp32), not just in direction."""
    kind = entry["kind"]
    lowered = any(token in kind for token in ("int8", "int4", "fp16", "bf16", "fp8", "quant"))
    return kind == "onnx-fp32" or ("atol" in entry.get("parity", {}) and not lowered)


def _worst(results: list[dict[str, float]]) -> dict[str, float]:
    return {"max_abs_diff": max(r["max_abs_diff"] for r in results), "min_cosine": min(r["min_cosine"] for r in results)}


def manifest_artifacts(out: Path, report: Any, reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The manifest's per-artifact entries: what it is, what produced it, how it measured, how to re-check it."""
    checks = (reference or {}).get("checks", {})  # kept on each artifact's entry, not twice in the manifest
    entries = []
    for entry in [report.teacher] + report.artifacts:
        path = str(entry["path"])
        if path.startswith("("):  # a PyTorch model measured in place: no file to ship
            continue
        runtime = entry.get("runtime", "onnxruntime")
        item: dict[str, Any] = {"path": path, "kind": entry["kind"], "runtime": runtime,
                                "measurable": measurable(out / path, runtime),
                                "providers": entry.get("providers", ["CPUExecutionProvider"])}
        if path.endswith(".onnx") and (out / path).is_file():
            item["opset"] = onnx_opset(out / path)
            item["ops"] = entry.get("ops") or op_precision(out / path)
        item.update({"parity": entry.get("parity", {}), "latency_ms": entry.get("latency_ms"),
                     "speedup": entry.get("speedup"), "quality": entry.get("quality", {})})
        if path in checks:
            item["check"] = checks[path]
        entries.append(item)
    return entries


# --------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One line of ``potstill verify``: what was checked, on which file, and whether it held."""

    status: str  # "ok", "FAIL", "skip"
    what: str  # "hash", "parity", "fresh", "run"
    file: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.what:<6}  {self.file}: {self.detail}"


@dataclass
class Verification:
    checks: list[Check] = field(default_factory=list)
    seed: int = 0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed


def read_manifest(bundle: Path | str) -> dict[str, Any]:
    """The bundle's manifest, or a one-line error naming the folder and what to pass instead."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such folder; pass a bundle folder (the --out of `potstill run`)")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: not found; {bundle} is not a potstill bundle, or its run did not finish "
                          "(run `potstill run` again to write it)")
    try:
        manifest = io.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); restore it from the original bundle") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: has no `files` table; it was not written by potstill, restore the original")
    return manifest


def _hash_checks(bundle: Path, manifest: dict[str, Any]) -> list[Check]:
    checks = []
    for name, entry in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            checks.append(Check("FAIL", "hash", name, "missing; copy the whole bundle folder, not single files"))
        elif path.stat().st_size != entry["bytes"]:
            checks.append(Check("FAIL", "hash", name, f"{path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                                      "(truncated or replaced); restore the file from the original bundle"))
        elif io.sha256(path) != entry["sha256"]:
            checks.append(Check("FAIL", "hash", name, "sha256 differs from the manifest (the file changed); "
                                                      "restore it from the original bundle"))
        else:
            checks.append(Check("ok", "hash", name, f"sha256 {entry['sha256'][:12]}"))
    return checks


def _compare_line(metric: str, result: dict[str, float], check: dict[str, Any]) -> tuple[bool, str]:
    if metric == "max_abs_diff":
        passed = result["max_abs_diff"] <= check["atol"]
        return passed, f"max|diff| {result['max_abs_diff']:.3g} {'<=' if passed else '>'} atol {check['atol']:.3g}"
    passed = result["min_cosine"] >= check["floor"]
    return passed, f"min cosine {result['min_cosine']:.5f} {'>=' if passed else '<'} floor {check['floor']:.5f}"


def _available(providers: list[str]) -> tuple[list[str], list[str]]:
    import onnxruntime

    here = set(onnxruntime.get_available_providers())
    return [p for p in providers if p in here], [p for p in providers if p not in here]


def verify(bundle: Path | str, seed: int | None = None, echo: Callable[[str], None] | None = None) -> Verification:
    """Re-check a bundle: hashes, then every measurable artifact on stored and fresh inputs.

    :param seed: of the fresh inputs; None draws one (printed, so a failure can be replayed with ``--seed``).
    :param echo: called with each line as it is decided (the CLI prints them as they come).
    """
    from potstill.runtime import compare

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    seed = random.randrange(10**6) if seed is None else seed
    result = Verification(seed=seed)

    def add(check: Check) -> None:
        result.checks.append(check)
        if echo:
            echo(check.line())

    for check in _hash_checks(bundle, manifest):
        add(check)
    broken = {c.file for c in result.checks if c.status == "FAIL"}
    reference = manifest.get("reference")
    artifacts = manifest.get("artifacts", [])
    if not reference:
        for item in artifacts:
            add(Check("skip", "run", item["path"], "no reference data in this bundle (written by an older potstill)"))
        return result
    if {reference["inputs"], reference["outputs"]} & broken:
        for item in artifacts:
            add(Check("skip", "parity", item["path"], "the reference data failed its hash check (above)"))
        return result
    try:
        stored = _split(io.load_tensors(bundle / reference["inputs"]), "")
        outputs = io.load_tensors(bundle / reference["outputs"])
    except Exception as exc:  # a file the manifest does not list, or an old manifest: still one line
        add(Check("FAIL", "parity", reference["inputs"], f"cannot read the reference data ({exc})"))
        return result
    expected = {role: [outputs[f"{i}/{role}"] for i in range(len(stored))] for role in ("student", "teacher")}
    rng = random.Random(seed)
    rows = recombined_rows(stored, expected, rng)
    sessions: dict[str, Any] = {}
    runs: dict[str, list[torch.Tensor]] = {}
    by_path = {item["path"]: item for item in artifacts}
    order = sorted(artifacts, key=lambda item: item.get("kind") != "onnx-fp32")  # siblings before what derives from them
    random_batches: list[dict[str, torch.Tensor]] | None = None
    for item in order:
        path = item["path"]
        if not item.get("measurable"):
            add(Check("skip", "run", path, f"not run here: {item.get('runtime', '?')} (hash-checked only)"))
            continue
        files = [name for name in manifest["files"] if name == path or name.startswith(path + ".")]
        if any(name in broken for name in files):
            add(Check("skip", "parity", path, "not run: the file failed its hash check (above)"))
            continue
        check = item.get("check")
        if check is None:
            add(Check("skip", "parity", path, "the manifest records no tolerance for it"))
            continue
        usable, missing = _available(item.get("providers") or ["CPUExecutionProvider"])
        if not usable:
            add(Check("skip", "run", path, f"not run here: {', '.join(missing)} not available in this onnxruntime"))
            continue
        try:
            sess = session(bundle / path, providers=usable)
            stored_out = [_run(sess, batch) for batch in stored]
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            add(Check("FAIL", "run", path, f"ONNX Runtime cannot load or run it: {first}"))
            continue
        sessions[path], runs[path] = sess, stored_out
        on = f" on {', '.join(usable)}" + (f" ({', '.join(missing)} not available here)" if missing else "")
        metric = check["metric"]
        role = check["reference"]
        worst = _worst([compare(r, o) for r, o in zip(expected[role], stored_out)])
        passed, text = _compare_line(metric, worst, check)
        add(Check("ok" if passed else "FAIL", "parity", path,
                  f"vs PyTorch {role} on {reference['inputs']} ({len(stored)} batches){on}: {text}"))

        fresh_rows = _worst([compare(ref[role], _run(sess, batch)) for batch, ref in rows])
        passed, text = _compare_line(metric, fresh_rows, check)
        shapes = ", ".join(_shape(batch) for batch, _ in rows)
        add(Check("ok" if passed else "FAIL", "fresh", path,
                  f"vs PyTorch {role} on stored rows recombined into new batches ({shapes}): {text}"))

        if random_batches is None:
            vocab = reference.get("vocab_size")
            random_batches = [random_inputs(stored, _input_axes(sess), rng, vocab) for _ in range(FRESH_BATCHES)]
        shapes = ", ".join(_shape(b) for b in random_batches)
        sibling = check.get("sibling")
        if metric == "min_cosine" and sibling in sessions:
            worst = _worst([compare(_run(sessions[sibling], b), _run(sess, b)) for b in random_batches])
            passed, text = _compare_line(metric, worst, check)
            add(Check("ok" if passed else "FAIL", "fresh", path, f"vs {sibling} on random inputs ({shapes}): {text}"))
        elif metric == "min_cosine" and sibling:
            add(Check("skip", "fresh", path, f"vs {sibling} on random inputs: {sibling} did not run (above)"))
        else:
            produced = [_run(sess, b) for b in random_batches]
            finite = all(bool(torch.isfinite(p).all()) for p in produced)
            add(Check("ok" if finite else "FAIL", "fresh", path, f"runs on random inputs ({shapes}): "
                      + ("outputs finite" if finite else "non-finite outputs (NaN or inf)")))
    for name in by_path:
        if name not in manifest["files"] and not (bundle / name).exists():
            add(Check("FAIL", "hash", name, "an artifact the manifest lists has no file and no hash"))
    return result


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench(bundle: Path | str, threads: int | None = None, batch: int | None = None, seq: int | None = None,
          warmup: int | None = None, repeats: int | None = None) -> dict[str, Any]:
    """Time every measurable artifact on this machine, side by side; speed-ups are against ``teacher.onnx``.

    Runs are interleaved (one run of each artifact per round, in a rotating order) so that a slowdown of
    the machine during the measurement falls on every artifact alike. Defaults come from the run's
    ``measure`` settings recorded in the bundle's report.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    measurement = manifest.get("measurement", {})
    shape = measurement.get("batch_shape") or [4, 16]
    threads = threads or measurement.get("threads", 1)
    batch = batch or shape[0]
    seq = seq or (shape[1] if len(shape) > 1 else 16)
    warmup = measurement.get("warmup", 5) if warmup is None else warmup
    repeats = repeats or max(10, measurement.get("repeats", 30))
    reference = manifest.get("reference")
    if not reference:
        raise BundleError(f"{bundle / MANIFEST}: no reference inputs to build a batch from; rerun `potstill run`")
    stored = _split(io.load_tensors(bundle / reference["inputs"]), "")
    artifacts = [a for a in manifest.get("artifacts", []) if a.get("measurable")]
    skipped = [a for a in manifest.get("artifacts", []) if not a.get("measurable")]
    sessions = {}
    for item in artifacts:
        usable, _ = _available(item.get("providers") or ["CPUExecutionProvider"])
        if usable:
            sessions[item["path"]] = session(bundle / item["path"], threads, usable)
    if not sessions:
        raise BundleError(f"{bundle}: no artifact can run here (ONNX Runtime providers missing)")
    first = next(iter(sessions.values()))
    inputs = random_inputs(stored, _input_axes(first), random.Random(0), reference.get("vocab_size"),
                           shape=(batch, seq), full_mask=True)
    feeds = {path: {v.name: inputs[v.name].numpy() for v in sess.get_inputs()} for path, sess in sessions.items()}
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for offset in range(len(names)):
            name = names[(round_ + offset) % len(names)]
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    teacher = statistics.median(times[TEACHER]) if TEACHER in times else None
    results: dict[str, Any] = {}
    for item in artifacts:
        name = item["path"]
        if name not in times:
            results[name] = {"kind": item["kind"], "median_ms": None, "note": "providers not available here"}
            continue
        median = statistics.median(times[name])
        results[name] = {"kind": item["kind"], "providers": sessions[name].get_providers(),
                         "median_ms": round(median, 4), "p10_ms": round(_percentile(times[name], 10), 4),
                         "p90_ms": round(_percentile(times[name], 90), 4),
                         "speedup_vs_teacher": round(teacher / median, 3) if teacher else None}
    for item in skipped:
        results[item["path"]] = {"kind": item["kind"], "median_ms": None, "note": f"not run here: {item.get('runtime')}"}
    return {"bundle": str(bundle), "threads": threads, "batch_shape": list(next(iter(inputs.values())).shape[:2]),
            "warmup": warmup, "repeats": repeats, "statistic": "median (p10-p90), interleaved", "artifacts": results}


def bench_table(result: dict[str, Any]) -> str:
    """The terminal table of :func:`bench` (plain text: it is read in CI logs as often as in a terminal)."""
    header = f"{'artifact':<28} {'kind':<20} {'median ms':>10} {'p10':>9} {'p90':>9} {'vs teacher':>11}"
    lines = [f"bench: batch shape {result['batch_shape']}, {result['threads']} thread(s), {result['warmup']} warm-up, "
             f"{result['repeats']} interleaved runs each", header, "-" * len(header)]
    for name, item in result["artifacts"].items():
        if item["median_ms"] is None:
            lines.append(f"{name:<28} {item['kind']:<20} {item.get('note', '-')}")
            continue
        ratio = f"{item['speedup_vs_teacher']:.2f}x" if item.get("speedup_vs_teacher") else "-"
        lines.append(f"{name:<28} {item['kind']:<20} {item['median_ms']:>10.3f} {item['p10_ms']:>9.3f} "
                     f"{item['p90_ms']:>9.3f} {ratio:>11}")
    return "\n".join(lines)
