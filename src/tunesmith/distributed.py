"""The processes of one training run, through Hugging Face accelerate (DDP underneath).

One process, the default, needs none of this: ``processes()`` then answers rank 0 of 1 and every
method is a no-op, so a single-process run computes exactly what it always did. Started by
``accelerate launch -m tunesmith train ...`` (or ``tunesmith train --num-processes N``, which runs
that launcher), each rank trains the same model on a disjoint slice of every batch; DDP averages
the gradients once per step, so every rank takes the same optimizer step. Only rank 0 writes the
run directory.
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a batch's block indices (the slices are disjoint and cover it)."""
        return index if self.world == 1 else np.array_split(index, self.world)[self.rank]

    def wrap(self, model, loss):
        """``loss(model, *args)`` as a callable module: in several processes a DistributedDataParallel
        module (DDP averages gradients when its forward's output is backpropagated)."""
        import torch

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return loss(self.model, *args)

        return Loss() if self.world == 1 else self.accelerator.prepare_model(Loss())

    def no_sync(self, module, sync: bool):
        """Inside: backward passes accumulate gradients locally; with ``sync`` the next backward averages them over ranks."""
        return nullcontext() if self.world == 1 or sync else self.accelerator.no_sync(module)

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
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise TunesmithError(
            f"tunesmith trains data-parallel (DDP) only; the accelerate configuration asks for "
            f"{accelerator.distributed_type.value}",
            hint="launch with an accelerate configuration of distributed_type MULTI_GPU or MULTI_CPU (docs/SCALING.md)",
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
        rank, failure = err.get_first_failure()
        sys.stderr.write(f"training process {rank} of {num_processes} stopped with exit status {failure.exitcode}\n")
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
