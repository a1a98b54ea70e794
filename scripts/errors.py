"""The cause of a failed command, said last: MONAI's config parser wraps an error (a missing datalist, a file that
names its problem) in several "Failed to instantiate/evaluate ..." ones, so the message that matters ends up in
the middle of a long traceback."""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["error_chain", "root_cause", "install_cause_hook"]


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``raise ... from``, or raised while handling another),
    outermost first, as Python shows them: a ``raise ... from None`` ends the chain there."""
    chain = [error]
    while (inner := _inner(chain[-1])) is not None and all(inner is not e for e in chain):
        chain.append(inner)
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain (:func:`error_chain`)."""
    return error_chain(error)[-1]


def install_cause_hook() -> None:
    """After Python's usual traceback of an uncaught error, repeat the innermost cause as the last line, when it
    differs from the outermost error. Installed once; the traceback itself is unchanged."""
    previous = sys.excepthook
    if getattr(previous, "said_last", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        previous(kind, value, tb)
        cause = root_cause(value)
        if cause is not value:
            sys.stderr.write(f"\nCause (raised first, above): {type(cause).__name__}: {cause}\n")

    hook.said_last = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _inner(error: BaseException) -> BaseException | None:
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__
