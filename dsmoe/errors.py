"""The errors users can fix. Anything raised as UserError reaches the CLI user as one sentence, no traceback."""


class UserError(ValueError):
    """Bad input (config, path, checkpoint, flag); the message says what is wrong and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that does not match its config or cannot be read; the message names file and key."""
