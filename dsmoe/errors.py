"""The errors users can fix. Anything raised as UserError reaches the CLI user as one sentence, no traceback."""


class UserError(ValueError):
    """Bad input (config, path, checkpoint, flag); the message says what is wrong and how to fix it."""


class RequestError(UserError):
    """A request the engine cannot run; `param` names the sampling parameter at fault (a server's 400 names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CheckpointError(UserError):
    """A checkpoint that does not match its config or cannot be read; the message names file and key."""
