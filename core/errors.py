"""One error type for bad input: the CLIs print its message on one line and exit 2."""
from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
# Functions that turn a failure of some outside system into one line for the user (or None when the
# failure is not theirs). The cache layer adds the object store's; the core knows none of them.
EXPLAINERS: list[Callable[[BaseException], str | None]] = []


class PipelineError(Exception):
    """Bad input or an unusable state; the message names what was wrong and what is allowed."""


def explain_with(fn: Callable[[BaseException], str | None]) -> None:
    """Register a function that explains an outside system's failure in one line (see EXPLAINERS)."""
    if fn not in EXPLAINERS:
        EXPLAINERS.append(fn)


def _explained(e: BaseException) -> str | None:
    for fn in EXPLAINERS:
        message = fn(e)
        if message is not None:
            return message
    return None


def one_line_errors(fn: F) -> F:
    """Turn PipelineError (and a full disk) into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # aiohttp (under s3fs) logs "Task exception was never retrieved" with a traceback for connections
        # that dropped while our retries were already handling the request; the user gets our one line instead
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            _fail(str(e))
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                _fail(f"disk full ({e.filename or 'cache'}): free space or choose another "
                      "location; what was written so far is kept and the run resumes")
            message = _explained(e)
            if message is not None:
                _fail(message)
            _report(f"{type(e).__name__}: {e}")
            raise
        except BaseException as e:
            message = _explained(e) if isinstance(e, Exception) else None
            if message is not None:  # an object store that stayed away (raised outside remote_errors)
                _fail(message)
            if not isinstance(e, SystemExit) or e.code not in (0, None):
                _report(f"{type(e).__name__}: {e}")
            raise

    return wrapper  # type: ignore[return-value]


def _report(message: str) -> None:
    """Under torchrun, tell the other ranks (they stop within seconds instead of waiting for us)."""
    if "torch.distributed" in sys.modules:
        from . import distributed
        distributed.report_failure(message)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    _report(message)
    if "torch.distributed" in sys.modules:
        from . import distributed
        distributed.exit_now(2)
    sys.exit(2)

