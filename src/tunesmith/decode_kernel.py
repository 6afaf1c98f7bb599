"""The decoding step in C++ (``decode_kernel.cpp``), for one or several rows, built once per machine.

At batch 1 on a CPU, a step of the Python decoder (``decoder.Decoder.forward``) spends about a
third of its time outside the weight products, in ~1,500 small dispatched operators (norms,
rotary embedding, residual adds, views, attention), and its products (``torch.mv``,
``torch._weight_int8pack_mm``) read the weights at about 15 and 10 GB/s. The C++ step does the
vector work between the products and the one-query attention in plain loops, and the products
of a bf16 model (bf16 or int8 weights) in AVX-512 loops that fetch the weights ahead of use
(about 20 GB/s); several bf16 rows multiply on AMX tiles where the CPU has them (4 rows cost
about what 1 does). Elsewhere (fp32, no AVX-512) its products are PyTorch's. Off the main
thread its products run on helper threads of its own (PyTorch's second OpenMP team there sleeps
between calls). Every row's results are the same whatever the other rows, which is what lets the
server batch its users. The sampler's passes over the vocabulary (``log_norms``, ``candidates``;
``generate._sampler``) are here too: in PyTorch they were some 30 dispatched operators a step. The bundled model, ``generate``: about 61 tokens/s in bf16 against 32
for the Python step, 90 against 46 with int8 weights (measured here, bench/NOTES.md, decoding
round 5). ``torch.compile`` was measured slower than the eager step here, which is why this is
written out rather than generated.

It is built with PyTorch's own extension builder (``torch.utils.cpp_extension.load``: a C++
compiler and ninja, about 30 s on 2 cores) into PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), once per machine and
PyTorch version; ``make setup`` builds it. Where it cannot be built (no compiler), decoding
stays on the Python step, with one warning. ``TUNESMITH_DECODE_KERNEL=off`` keeps the Python
step.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

SOURCE = Path(__file__).with_name("decode_kernel.cpp")
NAME = "tunesmith_decode_step"
ENV = "TUNESMITH_DECODE_KERNEL"  # "off" keeps the Python decoding step

# The products split their rows between PyTorch's threads (at::parallel_for), which needs OpenMP
# where PyTorch uses it (Linux builds). The extension then asks for libgomp.so.1, and the loader
# hands it the copy PyTorch already loaded: one thread pool in the process.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

_lock = threading.Lock()
_module = None
_failed: str | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "auto").strip().lower() not in ("off", "0", "false", "no")


def load(*, quiet: bool = False):
    """The built extension module (building it if needed), or None where it cannot be had: turned
    off, or the build failed (the reason is kept in ``failure()``; warned about once)."""
    global _module, _failed
    if not enabled():
        return None
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load as build

                _module = build(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3", *_OPENMP],
                                extra_ldflags=_OPENMP, verbose=False)
            except Exception as exc:  # noqa: BLE001 - any build failure: keep the Python step
                _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                if not quiet:
                    import warnings

                    warnings.warn(f"the C++ decoding step could not be built ({_failed}); decoding uses the "
                                  f"Python step (set {ENV}=off to skip the build)", stacklevel=2)
    return _module


@contextmanager
def one_thread():
    """PyTorch's operators on this thread run on one thread inside the block, OpenMP's and MKL's
    (where the extension is built; elsewhere nothing changes). The server's loop samples in it:
    operators over one vocabulary gain nothing from a second thread, off the main thread that
    thread is woken from sleep for each of them, and then spins on beside the next step."""
    module = _module
    if module is None:
        yield
        return
    before = module.threads_here(1)
    mkl_before = module.mkl_threads_here(1)
    try:
        yield
    finally:
        module.threads_here(before)
        if mkl_before >= 0:
            module.mkl_threads_here(mkl_before)


def failure() -> str | None:
    """Why the build failed in this process (None: not tried, or built)."""
    return _failed


def main() -> None:
    """``python -m tunesmith.decode_kernel``: build the extension now (make setup runs this)."""
    import sys
    import time

    start = time.perf_counter()
    module = load(quiet=True)
    if module is None:
        print(f"the C++ decoding step was not built: {failure() or f'{ENV}=off'}", file=sys.stderr)
        return
    print(f"C++ decoding step ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
