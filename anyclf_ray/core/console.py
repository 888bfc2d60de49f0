"""What the default console shows: the project's own lines, Ray Data's progress bars on a
terminal, and none of the Ray lines that alarm without cause. ``--verbose`` shows everything
(``runtime.connect`` calls neither function then).

In: a driver process about to join or start Ray. Out: the chatty Ray loggers quieted
(``quiet_loggers``), and its standard error (file descriptor 2, where Ray's C++ core worker
writes) passed through a filter that drops the lines of ``FALSE_ALARMS``, each with the reason it
is one (``filter_stderr``). Ray's log files are untouched: only this process's console is filtered.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

# Ray Data's per-dataset start/plan/finish lines, and off a terminal its progress as log lines
# (every few seconds per pass); the project's own progress lines and status.json say the same.
# Ray's "Started a local Ray instance" (the project says which cluster it joined or started);
# sentence-transformers' and SetFit's model load and save paths (temporary folders).
CHATTY_LOGGERS = ("ray.data._internal.execution.streaming_executor", "ray.data.dataset",
                  "ray.data._internal.progress", "ray._private.worker", "sentence_transformers", "setfit")
# Ray's notice that an embedded cluster uses its default, token authentication: nothing to do
# (its warning that a cluster runs without authentication still shows).
SECURE_DEFAULT = ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled")
# Ray Core warns for every Ray Data actor pool, whose workers get their constructor arguments by
# reference and may restart: "Actor ... has constructor arguments in the object store and
# max_restarts > 0" (ray-project/ray#57733, open; restarts do work, the tracker the references
# point to is detached). It is printed by the driver's C++ core worker at level E, so no Python
# logging setting reaches it.
FALSE_ALARMS = (b"has constructor arguments in the object store and max_restarts > 0",)

_filtered = False


def quiet_loggers() -> None:
    """The chatty loggers at WARNING, and no model-loading progress bars (a second each, on the
    driver); before Ray starts, so its start lines are quiet too."""
    from huggingface_hub.utils import disable_progress_bars

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    name, notice = SECURE_DEFAULT
    logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith(notice))
    disable_progress_bars()  # transformers' bars follow this switch if it is imported later
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def filter_stderr(dropped: tuple[bytes, ...]) -> None:
    """Route file descriptor 2 through a pipe whose reader thread copies every line to the real
    standard error except those containing one of ``dropped``. Text without a line end yet (a
    progress bar's ``\\r`` updates) is copied at once; at exit the pipe is drained first, so a
    last traceback is never lost."""
    global _filtered
    if _filtered:  # once per process
        return
    _filtered = True
    console, original = os.dup(2), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source, os.fdopen(console, "wb", buffering=0) as sink:
            while chunk := source.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = [line + b"\n" for line in lines if not any(alarm in line for alarm in dropped)]
                # A partial line that cannot be one of Ray's (they start with "[<time>") goes out now.
                if pending and not pending.startswith(b"["):
                    kept.append(pending)
                    pending = b""
                sink.write(b"".join(kept))
            sink.write(pending)

    thread = threading.Thread(target=copy, name="console-filter", daemon=True)
    thread.start()

    def restore() -> None:
        # The real standard error back on fd 2 closes the pipe's write end, so the reader copies
        # what is left and ends (once any child that inherited the pipe is gone too).
        sys.stderr.flush()
        os.dup2(original, 2)
        thread.join(timeout=2)

    atexit.register(restore)
