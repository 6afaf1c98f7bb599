"""The processes of one training run, through Hugging Face accelerate (DDP underneath).

One process, the default, needs none of this: ``processes()`` then answers rank 0 of 1 and every
method is a no-op, so a single-process run computes exactly what it always did. Started by
``accelerate launch -m tunesmith train ...`` (or ``tunesmith train --num-processes N``, which runs
that launcher), each rank trains the same model on a disjoint slice of every batch; DDP averages
the gradients once per step, so every rank takes the same optimizer step. Only rank 0 writes the
run directory.

Where the launcher's configuration asks for FSDP, the model's decoder layers and its body are
sharded over the ranks with FSDP2 (``fully_shard``) instead: each rank keeps its shard of the
weights and optimizer state, the full tensors are gathered for a forward pass, and a checkpoint's
weights and optimizer state are gathered whole on rank 0, so it is the same file as in DDP or one
process.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import numpy as np

from .errors import TunesmithError


class Processes:
    """This process's place among the ranks of a run, and the few collectives training needs."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        # accelerate reports FSDP only on GPUs; its launcher's flag says what the configuration asked for
        self.sharded = self.world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a batch's block indices (the slices are disjoint and cover it)."""
        return index if self.world == 1 else np.array_split(index, self.world)[self.rank]

    def wrap(self, model, loss, opt=None, units=()):
        """``loss(model, *args)`` as a callable module: in several processes a DistributedDataParallel
        module (DDP averages gradients when its forward's output is backpropagated). Under FSDP each
        module of ``units`` (inner ones first, the outermost last) is sharded instead, and ``opt``
        moves to the sharded parameters, its state included."""
        import torch

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return loss(self.model, *args)

        if self.sharded:
            self._shard(model, opt, units)
            return Loss()
        return Loss() if self.world == 1 else self.accelerator.prepare_model(Loss())

    def _shard(self, model, opt, units) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import fully_shard

        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        saved = opt.state_dict()  # whole tensors (a resumed checkpoint's), numbered in ``order``
        for unit in units:
            fully_shard(unit)
        params = dict(model.named_parameters())  # the same names, now sharded
        for group in opt.param_groups:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        opt.state.clear()
        if saved["state"]:
            set_optimizer_state_dict(model, opt, _by_name(saved, order), options=StateDictOptions(full_state_dict=True))

    def gather(self, model, opt) -> tuple[dict | None, dict | None]:
        """Under FSDP, the whole trainable weights (by name) and optimizer state (numbered as
        ``opt.state_dict()`` numbers them) on rank 0, empty on the others; every rank must call it.
        Otherwise ``(None, None)``: the model and optimizer hold them whole already."""
        if not self.sharded:
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)
        state = get_optimizer_state_dict(model, opt, options=options)
        return weights, (_by_index(state) if self.is_main else {})

    def most(self, count: int) -> int:
        """Under FSDP, the largest ``count`` of any rank (every forward pass gathers weights from
        all ranks, so every rank runs as many as the busiest one); otherwise ``count``."""
        if not self.sharded:
            return count
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([count])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def no_sync(self, module, sync: bool):
        """Inside: backward passes accumulate gradients locally; with ``sync`` the next backward averages them over ranks.
        (FSDP reduces each backward's gradients into the shards.)"""
        return nullcontext() if self.world == 1 or sync or self.sharded else self.accelerator.no_sync(module)

    def sum(self, tensor):
        """``tensor`` summed over ranks (every rank gets the sum)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def share(self, value):
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError:  # rank 0 stopped (a bad input, say) and printed why
            raise TunesmithError(f"rank {self.rank}: rank 0 stopped before training began; its message says why") from None
        return box[0]


def _by_name(state: dict, names: list[str]) -> dict:
    """An optimizer state numbered as ``Optimizer.state_dict()`` numbers it, keyed by parameter name."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}


def _by_index(state: dict) -> dict:
    """The reverse of ``_by_name``: parameter names numbered in the order of the parameter groups."""
    index = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]]}


_current: Processes | None = None


def processes(device: str = "auto") -> Processes:
    """This process's ranks. Started by accelerate's launcher with more than one process, the process
    group is set up on the first call (gloo on CPUs or with device ``cpu``, NCCL on CUDA GPUs);
    otherwise a single process."""
    global _current
    if _current is None:
        _current = _start(device)
    return _current


def _start(device: str) -> Processes:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from .device import pick_device

    accelerator = Accelerator(cpu=pick_device(device) == "cpu")  # gloo on CPUs
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        raise TunesmithError(
            f"tunesmith trains data-parallel (DDP) or sharded (FSDP) only; the accelerate configuration asks for "
            f"{accelerator.distributed_type.value}",
            hint="launch with an accelerate configuration of distributed_type MULTI_GPU, MULTI_CPU or FSDP (docs/SCALING.md)",
        )
    return Processes(accelerator)


def launch(num_processes: int, args: list[str]) -> int:
    """Run ``tunesmith ARGS`` in ``num_processes`` processes on this machine through accelerate's
    launcher (torchrun underneath); returns the exit status. Each rank prints its own messages; a
    failure is summed up in one line instead of the launcher's report."""
    import logging

    import psutil
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    launcher = launch_command_parser().parse_args([
        "--multi_gpu", "--num_machines", "1", "--num_processes", str(num_processes),
        "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(max(1, cores // num_processes)),
        "-m", "tunesmith", *args,
    ])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report repeats ours
    try:
        launch_command(launcher)
    except ChildFailedError as err:
        # A rank that exited with a status, not one killed by a signal as the launcher tore the
        # others down; the lowest such rank (a rank that stops because rank 0 did says so itself,
        # and the launcher may record it first).
        rank, failure = min(err.failures.items(), key=lambda item: (item[1].exitcode <= 0, item[0]))
        sys.stderr.write(f"training process {rank} of {num_processes} stopped with exit status {failure.exitcode}\n")
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
