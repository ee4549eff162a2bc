"""What the console shows: libraries' notices that mean nothing to a user of this tool are silenced here.

- transformers / diffusers / huggingface_hub: per-file progress bars ("Loading weights", "Writing model
  shards") and advisory warnings (e.g. that ``accelerate`` is not installed, which only changes how fast a
  model loads);
- open_clip's "no pretrained weights ... initialized randomly" for the offline tiny models, which are random
  by design (the tiny_models stage says so once in its summary). The same notice for any other model is kept.

Environment variables are set (``setdefault``: a user's own choice wins) so that subprocesses such as the
training ranks inherit the same quiet.
"""

from __future__ import annotations

import logging
import os
import sys

_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
_TINY_MARKERS = ("tiny_models", "tiny-")


# orchestrator notices a user of `ppd` has no use for (the temporary server is started and stopped for them)
_NOISE = ("for more information on running a dedicated Prefect server",)


class _TinyRandomInitFilter(logging.Filter):
    """Drops open_clip's random-initialisation notices about the offline tiny models only, and :data:`_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        random_init = "initialized randomly" in message or "no CLIP weights found" in message
        if random_init and any(m in message for m in _TINY_MARKERS):
            return False
        return not any(n in message for n in _NOISE)


def quiet_libraries() -> None:
    """Silence the notices above for this process and its subprocesses (idempotent, imports nothing: the
    libraries read the environment when they are first imported; ones already imported are told directly)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    root = logging.getLogger()
    if not any(isinstance(f, _TinyRandomInitFilter) for f in root.filters):
        root.addFilter(_TinyRandomInitFilter())


def quiet_handlers() -> None:
    """Also filter the handlers configured by then (records of child loggers pass the handlers, not the root's
    filters), and keep per-task "Finished in state Completed()" lines out: the flow says one line per stage.
    Call after the orchestrator has configured logging."""
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for handler in [h for logger in loggers for h in logger.handlers]:
        if not any(isinstance(f, _TinyRandomInitFilter) for f in handler.filters):
            handler.addFilter(_TinyRandomInitFilter())
