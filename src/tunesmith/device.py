"""Pick the device, dtype and thread count for this machine."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        return check_device(device)
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """``device`` if this torch can use it, else a TunesmithError saying why."""
    import torch

    from .errors import TunesmithError

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise TunesmithError(f"unknown device '{device}'; use auto, cpu, cuda (or cuda:N) or mps", field="device")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TunesmithError(f"cannot use '{device}': {why}", field="device", hint="use --device cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            from .wording import counted

            raise TunesmithError(
                f"cannot use '{device}': this machine has {counted(torch.cuda.device_count(), 'CUDA GPU')}",
                field="device",
            )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise TunesmithError(f"cannot use '{device}': Apple MPS is not available here", field="device",
                             hint="use --device cpu or auto")
    return device


DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def bf16_ok(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device == "cpu":
        return cpu_has_bf16()
    return False


def pick_dtype(device: str, requested: str | None = "auto"):
    """``auto`` means bf16 where the hardware supports it, fp32 elsewhere."""
    import torch

    if requested in (None, "auto"):
        return torch.bfloat16 if bf16_ok(device) else torch.float32
    if requested not in DTYPES:
        from .errors import TunesmithError

        raise TunesmithError(f"unknown dtype '{requested}'; use auto, bf16, fp16 or fp32", field="dtype")
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[requested]


def setup_threads() -> int:
    """Use one thread per physical core; hyper-threads slow matmuls down (unless OMP_NUM_THREADS is set)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
        per_core = len(siblings.replace("-", ",").split(",")) if siblings else 1
    except OSError:
        per_core = 1
    threads = max(1, cores // max(1, per_core))
    torch.set_num_threads(threads)
    return threads
