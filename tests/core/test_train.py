"""The distillation loop (core/train.py): batches, schedule, and resumption that ends bit-exact.

The resumption tests compare the final student weights of an interrupted-then-resumed run with those of
an uninterrupted run of the same spec, tensor by tensor with ``torch.equal``: a resumed run must not be
merely close, it must be the same run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from potstill import io, train
from potstill.pipeline import run
from potstill.spec import DistillOptions
from potstill.train import CHECKPOINT_META, batch_indices

STEPS = 6


def distill_spec(tiny_spec, steps: int = STEPS, checkpoint_every: int = 2, dropout: bool = True):
    # dropout on: the resumed run must also restore the RNG state to draw the same dropout masks
    return tiny_spec(stages=[
        {"student": {"name": "layer_drop", "keep": [0, 2]}},
        {"distill": {"steps": steps, "batch_size": 8, "checkpoint_every": checkpoint_every, "dropout": dropout,
                     "optimizer": {"lr": 1.0e-3, "warmup_steps": 2},
                     "losses": [{"name": "embedding_cosine"}, {"name": "minilm_relations"}]}},
    ], measure={"latency": False, "heldout_batches": 1, "batch_size": 4, "seq_len": 16})


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return io.load_tensors(out / "stages" / "1-distill" / "state.safetensors")


def assert_same_weights(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(tiny_spec, tmp_path_factory):
    """One uninterrupted run; its final weights are what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    report = run(distill_spec(tiny_spec), out=out, progress=False)
    assert report is not None
    return out


# ------------------------------------------------------------------ batches and schedule


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    assert batch_indices(50, 8, 3, seed=7) == batch_indices(50, 8, 3, seed=7)
    assert batch_indices(50, 8, 3, seed=7) != batch_indices(50, 8, 3, seed=8)


def test_batch_indices_cover_each_example_at_most_once_per_epoch():
    n, batch_size = 50, 8
    per_epoch = n // batch_size
    epoch = [i for step in range(per_epoch) for i in batch_indices(n, batch_size, step, seed=0)]
    assert len(epoch) == len(set(epoch)) == per_epoch * batch_size
    assert all(len(batch_indices(n, batch_size, step, seed=0)) == batch_size for step in range(3 * per_epoch))
    # the next epoch is a different shuffle
    assert batch_indices(n, batch_size, per_epoch, seed=0) != batch_indices(n, batch_size, 0, seed=0)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    options = DistillOptions(steps=10, losses=[{"name": "kd"}], optimizer={"warmup_steps": 2, "schedule": "linear"})
    factor = train._schedule(options)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == 1.0 and factor(6) == pytest.approx(0.5) and factor(10) == 0.0
    constant = train._schedule(DistillOptions(steps=10, losses=[{"name": "kd"}], optimizer={"schedule": "constant"}))
    assert {constant(s) for s in range(10)} == {1.0}


# ------------------------------------------------------------------ resumption


@pytest.mark.parametrize("stop_after", [3, 4])
def test_interrupted_distill_resumes_to_the_same_weights(tiny_spec, tmp_path, reference_run, stop_after):
    spec = distill_spec(tiny_spec)
    assert run(spec, out=tmp_path, progress=False, stop_after_steps=stop_after) is None
    stage_dir = tmp_path / "stages" / "1-distill"
    assert not (stage_dir / "stage.json").exists(), "an interrupted stage must not look finished"
    checkpoint_step = io.read_json(stage_dir / CHECKPOINT_META)["step"]
    assert checkpoint_step == stop_after - stop_after % 2  # the last checkpoint (checkpoint_every=2)

    report = run(spec, out=tmp_path, progress=False)

    assert report is not None
    distill = report.stages[1]
    assert distill["record"]["resumed_from"] == checkpoint_step
    assert distill["record"]["steps"] == STEPS
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_checkpoint_of_another_spec_is_not_resumed(tiny_spec, tmp_path, reference_run):
    """A checkpoint left by a different spec prefix (here: another learning rate) is ignored, not loaded."""
    other = distill_spec(tiny_spec)
    other["stages"][1]["distill"]["optimizer"]["lr"] = 5.0e-3
    assert run(other, out=tmp_path, progress=False, stop_after_steps=4) is None

    report = run(distill_spec(tiny_spec), out=tmp_path, progress=False)

    assert report.stages[1]["record"]["resumed_from"] is None
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_a_crash_while_a_checkpoint_is_written_resumes_from_the_previous_one(tiny_spec, tmp_path, reference_run,
                                                                              monkeypatch):
    """Killed after the tensors of a checkpoint were written but before its meta file: the run must resume
    from a consistent checkpoint, never from step-4 weights labelled as step 2."""
    real_write_json = train.write_json

    def crash_at_step_4(path, value):
        if Path(path).name == CHECKPOINT_META and value["step"] == 4:
            raise KeyboardInterrupt("simulated kill while writing the checkpoint of step 4")
        real_write_json(path, value)

    monkeypatch.setattr(train, "write_json", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(distill_spec(tiny_spec), out=tmp_path, progress=False)
    monkeypatch.undo()

    report = run(distill_spec(tiny_spec), out=tmp_path, progress=False)

    assert report.stages[1]["record"]["resumed_from"] == 2
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_killed_run_resumes_to_the_same_weights(tiny_spec, tmp_path, tmp_path_factory):
    """A real SIGKILL of ``potstill run`` mid-distillation, then the same command again."""
    steps = 12
    spec = distill_spec(tiny_spec, steps=steps, checkpoint_every=1, dropout=False)
    # a corpus file: the subprocesses then skip collecting the bundled sentences (seconds per process)
    corpus = tmp_path / "corpus.txt"
    words = "the a model student teacher learns small fast layer weight quickly slowly from every".split()
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(4, 20))) for _ in range(200)), encoding="utf-8")
    spec["data"] = {"name": "text_lines", "path": str(corpus), "heldout": 32}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "bundle"
    stage_dir = out / "stages" / "1-distill"
    # one thread like the in-process reference run, so the arithmetic is the same
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "potstill.cli", "run", str(spec_path), "--out", str(out), "--no-progress"]

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (stage_dir / CHECKPOINT_META).exists():
            assert process.poll() is None, f"run ended before its first checkpoint:\n{process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = io.read_json(stage_dir / CHECKPOINT_META)["step"]
    assert killed_at < steps and not (stage_dir / "stage.json").exists(), "the kill came too late to test resumption"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    record = io.read_json(out / "report.json")["stages"][1]["record"]
    assert record["resumed_from"] is not None and record["resumed_from"] >= killed_at

    reference = tmp_path_factory.mktemp("uninterrupted_killed_spec")
    assert run(spec, out=reference, progress=False) is not None
    assert_same_weights(final_weights(out), final_weights(reference))
