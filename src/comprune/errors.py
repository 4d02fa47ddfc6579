"""User-facing errors: one line naming the problem and the fix; the CLI prints them without a traceback."""


class CompruneError(Exception):
    """A problem with the user's input or environment (exit code 2 in the CLI)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CompruneError(message)
