"""Data-parallel training: 2 processes over gloo on the CPU compute what 1 process computes for
the same global batch, write one run directory, and their checkpoints resume in 1 process (and a
1-process checkpoint in 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith.rundir import Run

TEXT = "".join(
    f"The lamp burned low in study number {i}. Holmes leaned back and closed his eyes for {i} minutes. "
    f"\"You have come {i} miles,\" he said at last. The visitor nodded and said nothing.\n\n"
    for i in range(24)
)
# 17 blocks of 64 tokens, a global batch of 4: 5 steps an epoch, the last of 1 block (one rank
# then has nothing of it and takes a zero-weighted pass).
OPTIONS = dict(base="tiny-llama", block_size=64, batch_size=4, epochs=2, save_every=3, keep_checkpoints=10,
               sample_tokens=8, seed=7, dtype="fp32")
COMPUTED = ("step", "epoch", "elapsed_tokens", "learning_rate", "training_loss", "training_token_accuracy",
            "validation_loss", "validation_token_accuracy")
EXACT = ("step", "epoch", "elapsed_tokens", "learning_rate")
# Each rank computes its blocks as a smaller matmul and the gradients are summed in another order, so
# in fp32 the two runs agree to rounding (measured: losses within 1e-7 relative, adapter weights
# within 2e-6 after 10 steps); AdamW's normalised updates keep such differences from growing over
# a few steps. The tolerances leave a margin of 5x on the weights and 100x on the losses.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

SCRIPT = """
import json, sys
import tunesmith
args = json.loads(sys.argv[1])
show = lambda event: event.message and print(event.message)
if args.get("resume"):
    tunesmith.resume(args["resume"], progress=False, samples=False, on_event=show)
else:
    tunesmith.finetune(args["data"], out=args["out"], progress=False, samples=False, on_event=show, **args["options"])
"""
FSDP = ("--use_fsdp", "--fsdp_version", "2")  # what docs/accelerate/fsdp.yaml gives the launcher, on the CPU


def _launch(tmp: Path, args: dict, processes: int = 2, kind: tuple = ("--multi_gpu",)) -> subprocess.CompletedProcess:
    script = tmp / "ddp_script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", *kind, "--num_machines", "1",
               "--num_processes", str(processes), "--main_process_port", "0", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), json.dumps(args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _rows(run: Run) -> list[dict]:
    """Computed figures of each row, leaving out rows of sample figures (the command line writes samples)."""
    return [{k: row[k] for k in COMPUTED if k in row} for row in run.metrics() if "samples_copy_rate" not in row]


def _weights(run: Run) -> dict:
    return load_file(str(run.weights_dir / "adapter_model.safetensors"))


def assert_same_run(ours: Run, theirs: Run) -> None:
    a, b = _rows(ours), _rows(theirs)
    assert [{k: r[k] for k in EXACT if k in r} for r in a] == [{k: r[k] for k in EXACT if k in r} for r in b]
    for x, y in zip(a, b):
        for key in ("training_loss", "validation_loss"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=LOSS_RTOL), (x["step"], key)
        for key in ("training_token_accuracy", "validation_token_accuracy"):
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=1e-9), (x["step"], key)
    wa, wb = _weights(ours), _weights(theirs)
    assert wa.keys() == wb.keys()
    gaps = [abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in ("training_loss", "validation_loss") if k in y]
    print(f"largest relative loss difference {max(gaps):.1e}, "  # shown with -s: the measured agreement
          f"largest weight difference {max(float((wa[k] - wb[k]).abs().max()) for k in wb):.1e}")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=WEIGHT_ATOL) for k in wb)
    assert ours.best["step"] == theirs.best["step"]


def _cut_back_to(source: Run, target: Path, step: int) -> Run:
    """A copy of ``source`` as a run killed right after its checkpoint at ``step``: later checkpoints gone."""
    shutil.copytree(source.path, target)
    run = Run(target)
    for ckpt in run.checkpoints():
        if ckpt["step"] > step:
            shutil.rmtree(ckpt["path"])
    assert run.checkpoints()[-1]["step"] == step
    run.set_status("interrupted", step=step)
    return run


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir) -> Run:
    root = tmp_path_factory.mktemp("single")
    (root / "book.txt").write_text(TEXT)
    return tunesmith.finetune(root / "book.txt", out=root / "run", progress=False, samples=False, **OPTIONS)


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(single, tmp_path):
    (tmp_path / "book.txt").write_text(TEXT)
    result = _launch(tmp_path, {"data": str(tmp_path / "book.txt"), "out": str(tmp_path / "ddp"), "options": OPTIONS})
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = Run(tmp_path / "ddp")
    assert ddp.status == "succeeded"
    # one run directory, written once: every step logged once, one set of checkpoints
    assert [r["step"] for r in ddp.metrics()] == [r["step"] for r in single.metrics()]
    assert [c["step"] for c in ddp.checkpoints()] == [c["step"] for c in single.checkpoints()]
    assert_same_run(ddp, single)

    resumed = tunesmith.resume(_cut_back_to(ddp, tmp_path / "resumed", 3).path, progress=False, samples=False)
    assert resumed.status == "succeeded"
    assert_same_run(resumed, ddp)
    assert_same_run(resumed, single)


def test_fsdp_in_two_processes_matches_one_and_checkpoints_move_between_them(single, tmp_path):
    # FSDP2 shards the frozen base, the adapters and AdamW's state; each forward gathers them back, so
    # a step computes what DDP computes, to the same rounding (measured as for DDP above).
    (tmp_path / "book.txt").write_text(TEXT)
    result = _launch(tmp_path, {"data": str(tmp_path / "book.txt"), "out": str(tmp_path / "fsdp"), "options": OPTIONS},
                     kind=FSDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sharded (FSDP) over 2 processes") == 1
    fsdp = Run(tmp_path / "fsdp")
    assert fsdp.status == "succeeded"
    assert [c["step"] for c in fsdp.checkpoints()] == [c["step"] for c in single.checkpoints()]
    assert_same_run(fsdp, single)
    assert load_file(str(fsdp.path / "best" / "adapter" / "adapter_model.safetensors")).keys() == _weights(single).keys()

    # its checkpoint (gathered whole on rank 0) resumes in 1 process ...
    resumed = tunesmith.resume(_cut_back_to(fsdp, tmp_path / "resumed", 3).path, progress=False, samples=False)
    assert resumed.status == "succeeded"
    assert_same_run(resumed, single)
    # ... and a 1-process checkpoint, optimizer state included, resumes sharded over 2
    run = _cut_back_to(single, tmp_path / "from_single", 6)
    result = _launch(tmp_path, {"resume": str(run.path)}, kind=FSDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step-000006" in result.stdout
    assert run.status == "succeeded"
    assert_same_run(run, single)


def test_fsdp_ranks_with_unequal_micro_batches_keep_in_step(tmp_path, tiny_model_dir):
    # 3 blocks a step, 1 per forward pass: rank 0 takes 2 passes, rank 1 takes 1 and a pass weighted 0
    # (under FSDP every pass gathers weights from both ranks; one pass fewer would hang the other).
    options = dict(OPTIONS, batch_size=3, micro_batch_size=1, epochs=1)
    (tmp_path / "book.txt").write_text(TEXT)
    result = _launch(tmp_path, {"data": str(tmp_path / "book.txt"), "out": str(tmp_path / "fsdp"), "options": options},
                     kind=FSDP)
    assert result.returncode == 0, result.stderr[-3000:]
    single = tunesmith.finetune(tmp_path / "book.txt", out=tmp_path / "one", progress=False, samples=False, **options)
    assert_same_run(Run(tmp_path / "fsdp"), single)


def test_a_one_process_checkpoint_resumes_in_two_from_the_command_line(single, tmp_path):
    run = _cut_back_to(single, tmp_path / "run", 6)
    result = subprocess.run([sys.executable, "-m", "tunesmith", "train", "--resume", str(run.path),
                             "--num-processes", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resuming from step-000006") == 1  # rank 0 alone reports
    assert result.stdout.count("data-parallel over 2 processes") == 1
    assert run.status == "succeeded"
    assert_same_run(run, single)


# -- the pieces, without launching --------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "docs" / "accelerate"
EXPECTED = {  # distributed type, processes, machines; launcher flags that follow from it
    "multi_cpu.yaml": ("MULTI_CPU", 2, 1, {"use_cpu": True}),
    "multi_gpu.yaml": ("MULTI_GPU", 4, 1, {"multi_gpu": True}),
    "multi_node.yaml": ("MULTI_GPU", 8, 2, {"multi_gpu": True, "main_process_ip": "10.0.0.1",
                                           "main_process_port": 29500, "machine_rank": 0}),
    "fsdp.yaml": ("FSDP", 4, 1, {"use_fsdp": True}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 4, 1, {"use_deepspeed": True}),
}


def test_every_documented_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    scaling = (CONFIGS.parent / "SCALING.md").read_text()
    assert all(f"docs/accelerate/{name}" in scaling for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_documented_accelerate_configs_are_what_accelerate_reads(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    kind, processes, machines, flags = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))  # a ClusterConfig: an unknown key is refused
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
    parsed = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "tunesmith", "train", "x"])
    args, _, _ = _validate_launch_command(parsed)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert {key: getattr(args, key) for key in flags} == flags


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_and_others_are_refused_before_anything_is_written(kind, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    from tunesmith import distributed

    class Launched:
        def __init__(self, cpu: bool):
            self.distributed_type, self.process_index, self.num_processes = DistributedType(kind), 0, 2

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_current", None)
    with pytest.raises(tunesmith.TunesmithError, match=rf"\(DDP\) or sharded \(FSDP\) only; the accelerate configuration asks for {kind}"):
        distributed.processes("cpu")
    monkeypatch.setattr(distributed, "_current", None)


def test_ranks_take_disjoint_contiguous_slices_that_cover_the_batch():
    import numpy as np

    from tunesmith.distributed import Processes

    def rank(r: int, world: int) -> Processes:
        p = Processes()
        p.rank, p.world = r, world
        return p

    batch = np.array([7, 3, 9, 1, 4, 8, 0, 2])
    assert [rank(r, 3).shard(batch).tolist() for r in range(3)] == [[7, 3, 9], [1, 4, 8], [0, 2]]
    assert [rank(r, 2).shard(batch[:1]).tolist() for r in range(2)] == [[7], []]
    assert rank(0, 1).shard(batch) is batch


def test_the_launcher_gets_the_command_without_num_processes():
    from tunesmith.cli import _without_option

    args = ["train", "book.txt", "--num-processes", "2", "--epochs", "1", "--num-processes=3", "--out", "r"]
    assert _without_option(args, "--num-processes") == ["train", "book.txt", "--epochs", "1", "--out", "r"]


def test_a_bad_input_with_two_processes_is_a_clear_message_without_a_traceback(tmp_path, tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "missing.txt"), "--base",
                             "tiny-llama", "--out", str(tmp_path / "run"), "--num-processes", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"error: {tmp_path / 'missing.txt'}: no such file or directory" in result.stderr
    # The summary names a rank that exited with a status: rank 0, or rank 1, which stops saying
    # that rank 0 did (which of the two the launcher records first is a race).
    assert re.search(r"training process [01] of 2 stopped with exit status 1\n", result.stderr), result.stderr
    assert "terminate called" not in result.stderr  # the process group is left before exiting
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
