"""The distillation loop: teacher and student outputs per batch, a weighted sum of losses, AdamW.

Resumable and reproducible on CPU: the batch of step ``s`` is a pure function of (seed, stage, s), so a
run restarted from a checkpoint sees the same batches; the checkpoint (written atomically every
``checkpoint_every`` steps) holds the student, the losses' own parameters, the optimizer and scheduler
state and the torch RNG state, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from potstill.capture import capture
from potstill.errors import PotstillError
from potstill.io import atomic_path, load_tensors, read_json, save_tensors, write_json
from potstill.sparsity import apply_masks
from potstill.spec import DistillOptions
from potstill.techniques import Context, Loss, Outputs, Task

CHECKPOINT = "checkpoint-{step}.safetensors"
CHECKPOINT_STATE = "checkpoint-{step}.pt"
CHECKPOINT_META = "checkpoint.json"


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of ``step``: epochs of seeded permutations, cut in consecutive batches."""
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    return order[position * batch_size: (position + 1) * batch_size].tolist()


def _schedule(options: DistillOptions) -> Callable[[int], float]:
    warmup, steps = options.optimizer.warmup_steps, options.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if options.optimizer.schedule == "constant":
            return 1.0
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _forward(task: Task, model: nn.Module, batch: dict[str, torch.Tensor], paths: dict[str, str], hidden: bool) -> Outputs:
    with capture(model, paths) as captured:
        outputs = task.forward(model, batch, hidden_states=hidden)
    outputs.features = dict(captured)
    return outputs


def _view(outputs: Outputs, keys: dict[str, str]) -> Outputs:
    """The outputs as one loss sees them: its own feature names."""
    return Outputs(
        logits=outputs.logits,
        embeddings=outputs.embeddings,
        hidden_states=outputs.hidden_states,
        attention_mask=outputs.attention_mask,
        features={name: outputs.features[key] for name, key in keys.items()},
    )


class Distiller:
    """One distill stage. ``run`` trains ``student`` in place and returns per-loss final values."""

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: list[Loss], options: DistillOptions,
                 ctx: Context, stage_index: int, state_dir: Path, fingerprint: str):
        self.student, self.teacher, self.losses, self.options = student, teacher, losses, options
        self.ctx, self.stage_index, self.state_dir, self.fingerprint = ctx, stage_index, state_dir, fingerprint
        self.loss_modules = nn.ModuleList(losses)
        for loss in losses:
            loss.setup(student, teacher)
        # each loss's features, namespaced so two losses never collide
        self.paths: dict[str, dict[str, str]] = {"student": {}, "teacher": {}}
        self.views: list[dict[str, dict[str, str]]] = []
        for i, loss in enumerate(losses):
            view: dict[str, dict[str, str]] = {}
            for role, model in (("student", student), ("teacher", teacher)):
                wanted = loss.capture(model, role)
                view[role] = {name: f"{i}.{name}" for name in wanted}
                self.paths[role].update({f"{i}.{name}": path for name, path in wanted.items()})
            self.views.append(view)
        self.hidden = any("hidden_states" in loss.needs for loss in losses)
        parameters = [p for p in student.parameters() if p.requires_grad] + list(self.loss_modules.parameters())
        opt = options.optimizer
        self.optimizer = torch.optim.AdamW(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(options))
        self.step = 0

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        tensors = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        tensors.update({f"losses.{k}": v for k, v in self.loss_modules.state_dict().items()})
        tensors["rng"] = torch.get_rng_state()
        # each checkpoint's parts are named by its step and the meta file, written last, points at them: a kill
        # between the writes leaves the previous checkpoint whole, never a mix of two steps
        save_tensors(self.state_dir / CHECKPOINT.format(step=self.step), tensors)
        with atomic_path(self.state_dir / CHECKPOINT_STATE.format(step=self.step)) as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, tmp)
        write_json(self.state_dir / CHECKPOINT_META, {"step": self.step, "fingerprint": self.fingerprint})
        current = {CHECKPOINT.format(step=self.step), CHECKPOINT_STATE.format(step=self.step)}
        for old in self.state_dir.glob("checkpoint-*"):
            if old.name not in current:
                old.unlink(missing_ok=True)

    def _try_resume(self) -> bool:
        meta_path = self.state_dir / CHECKPOINT_META
        if not meta_path.is_file():
            return False
        meta = read_json(meta_path)
        if meta.get("fingerprint") != self.fingerprint:
            return False
        step = int(meta["step"])
        tensors = load_tensors(self.state_dir / CHECKPOINT.format(step=step))
        self.student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")}, strict=True)
        self.loss_modules.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("losses.")}, strict=True)
        torch.set_rng_state(tensors["rng"])
        state = torch.load(self.state_dir / CHECKPOINT_STATE.format(step=step), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = step
        return True

    def _with_remaining(self, exc: PotstillError, seed: int) -> PotstillError:
        """A teacher's spent query budget, restated with what the rest of this stage still needs (a teacher with
        ``uncached_queries(batches)``, e.g. ``http_topk``, counts its uncached requests among them)."""
        count = getattr(self.teacher, "uncached_queries", None)
        if count is None or not hasattr(exc, "with_remaining"):
            return exc
        train, task, options = self.ctx.data.train, self.ctx.task, self.options  # type: ignore[union-attr]
        left = [task.collate([train[i] for i in batch_indices(len(train), options.batch_size, s, seed)], self.ctx.tokenizer)
                for s in range(self.step, options.steps)]
        return exc.with_remaining(count(left), f"the {len(left)} remaining steps of stage {self.stage_index}")

    # ------------------------------------------------------------------ training
    def run(self, on_step: Callable[[int, float], None] | None = None, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``options.steps`` (or stop after ``stop_after`` steps, for tests of resumption)."""
        ctx, options, task = self.ctx, self.options, self.ctx.task
        assert ctx.data is not None
        tokenizer = ctx.tokenizer
        resumed_from = self.step if self._try_resume() else None
        self.teacher.eval()
        self.student.train(options.dropout)
        self.loss_modules.train()
        seed = ctx.seed * 1000 + self.stage_index
        if resumed_from is None:
            torch.manual_seed(seed)
        train = ctx.data.train
        last: dict[str, float] = {}
        steps_done = 0
        while self.step < options.steps:
            if stop_after is not None and steps_done >= stop_after:
                break
            indices = batch_indices(len(train), options.batch_size, self.step, seed)
            batch = task.collate([train[i] for i in indices], tokenizer)
            active = []
            for loss, view in zip(self.losses, self.views):
                loss.on_step(self.step, options.steps)
                weight = loss.options.weight_at(self.step, options.steps)
                if weight > 0:
                    active.append((loss, view, weight))
            try:
                for loss, _, _ in active:
                    batch = loss.prepare(batch, self.student, self.teacher)
                student_batch = batch
                for loss, _, _ in active:
                    alternative = loss.student_batch(batch)
                    if alternative is not None:
                        if student_batch is not batch:
                            raise ValueError("distill: two losses of this stage change the student's input; keep one")
                        student_batch = alternative
                with torch.no_grad():
                    teacher_out = _forward(task, self.teacher, batch, self.paths["teacher"], self.hidden)
            except PotstillError as exc:
                raise self._with_remaining(exc, seed) from None
            student_out = _forward(task, self.student, student_batch, self.paths["student"], self.hidden)
            total = torch.zeros(())
            for loss, view, weight in active:
                value = loss(_view(student_out, view["student"]), _view(teacher_out, view["teacher"]), batch)
                if not torch.isfinite(value):
                    raise FloatingPointError(f"distill: loss {loss.name} is {float(value)} at step {self.step}; lower optimizer.lr")
                last[loss.name] = float(value.detach())
                total = total + weight * value
            self.optimizer.zero_grad(set_to_none=True)
            if total.requires_grad:  # every loss may be switched off at this step
                total.backward()
            if options.optimizer.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]], options.optimizer.max_grad_norm
                )
            self.optimizer.step()
            self.scheduler.step()
            apply_masks(self.student)
            self.step += 1
            steps_done += 1
            last["total"] = float(total.detach())
            if on_step is not None:
                on_step(self.step, last["total"])
            if self.step % options.checkpoint_every == 0 or self.step == options.steps:
                self._save()
        self.student.eval()
        return {"steps": self.step, "resumed_from": resumed_from, "final_losses": {k: round(v, 6) for k, v in last.items()},
                "finished": self.step >= options.steps and math.isfinite(last.get("total", 0.0))}
