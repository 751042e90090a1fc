"""The one error type users see: a one-line message naming the problem and the fix.

The CLI catches `UserError`, prints `error: <message>` and exits with status 2, no traceback.
Library code raises it for bad input (config, data, mesh, checkpoints); anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user; the message says what is wrong and how to fix it, in one line."""
