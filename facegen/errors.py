"""Exceptions with a meaning for the command line: a user's mistake exits 2 with one line."""


class FacegenError(Exception):
    """Base class of facegen's own errors."""


class UsageError(FacegenError):
    """A user's mistake (bad path, option, file, plugin name): one clear line, exit code 2."""


class SampleError(FacegenError):
    """One sample is unusable. Under --strict this stops the run; otherwise it is skipped and counted."""

    def __init__(self, ref: str, reason: str):
        super().__init__(f"{ref}: {reason}")
        self.ref = ref
        self.reason = reason
