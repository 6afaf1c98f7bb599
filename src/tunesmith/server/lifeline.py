"""The training worker's tie to the server that started it: when the server dies, even by SIGKILL,
the worker stops too (cleanly, after its current step: a checkpoint is kept and the job is marked
failed). A job never goes on training behind the back of a server that no longer exists.

On Linux the kernel sends SIGTERM at once (``prctl(PR_SET_PDEATHSIG)``); everywhere a thread also
notices within a second that the worker has been handed to another parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, stop: threading.Event, poll: float = 1.0) -> threading.Thread:
    """Set ``stop`` when the process ``parent_pid`` (this process's parent) is gone."""
    _parent_death_signal(signal.SIGTERM)

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:  # the parent died: this process was re-parented
                print(f"[worker {os.getpid()}] the server (pid {parent_pid}) is gone; stopping", flush=True)
                stop.set()
                return
            stop.wait(poll)

    thread = threading.Thread(target=watch, name="tunesmith-lifeline", daemon=True)
    thread.start()
    return thread
