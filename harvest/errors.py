"""One error type for bad input: the CLIs print its message on one line and exit 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class PipelineError(Exception):
    """Bad input or an unusable state; the message names what was wrong and what is allowed."""


def one_line_errors(fn: F) -> F:
    """Turn PipelineError (and a full disk) into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                print(f"error: disk full ({e.filename or 'cache'}): free space or choose another "
                      "location; what was written so far is kept and the run resumes", file=sys.stderr)
                sys.exit(2)
            raise

    return wrapper  # type: ignore[return-value]
