"""The errors users see: a one-line message naming the problem and the fix.

The CLI catches `UserError`, prints `error: <message>` and exits with status 2, no traceback.
Config, data, mesh, checkpoint and CLI code raise it for bad input; the math modules (outer
optimizer, codes, fragments) raise plain `ValueError`, which `UserError` subclasses, so
`except ValueError` catches both. `PeerFailure` (a lost process in a multi-process run) exits
with status 3, at once.
"""

import os
import sys


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it, in one line."""


class PeerFailure(UserError):
    """Another process of a multi-process run died, hung or fell behind past the timeout."""

    exit_status = 3


def exit_at_once(error: PeerFailure) -> None:
    """Print `error: ...` and end the process now: JAX's shutdown barrier at a normal exit
    would wait for the lost process."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(error.exit_status)
