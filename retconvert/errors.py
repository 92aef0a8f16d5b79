"""User-facing errors: one line naming the problem and the fix; the CLI exits non-zero."""


class RetconvertError(Exception):
    """A bad input or an impossible request. Printed as `error: <message>` without a traceback."""
