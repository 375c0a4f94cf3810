"""facegen's exceptions. Library code raises them; the command line maps each kind to an exit code in one place
(``FacegenGroup`` in ``facegen.cli``) and prints it as one line, never a traceback:

- exit 2, :class:`UsageError` (and its kinds :class:`FolderBusy`, :class:`OutOfSpace`, :class:`RankLost`): the
  user's input, options or environment must change before a rerun can work (a bad option or file, a busy folder, a
  full disk, a hostile input, a process of a distributed build that stopped);
- exit 2, :class:`SampleError`: under ``--strict``, a bad sample stopped the build;
- exit 1, :class:`CheckFailed`: a check the command exists to make failed (a publish check, a rebuild that
  differs from its card);
- exit 1, :class:`RemoteError`: a remote service failed (the Hub or a download server answered with a failure,
  see :func:`server_failed`); a rerun may work. No answer at all (no network) is a UsageError: the environment must
  change.

Ctrl-C and SIGTERM (exit 130 and 143) are handled by the command line too. Any other exception is a bug in
facegen and stays a traceback.
"""


class FacegenError(Exception):
    """Base class of facegen's own errors; raise one of its kinds, which say what the user can do."""


class UsageError(FacegenError):
    """The user's input, options or environment must change (bad path, option, file, plugin name, hostile input)."""


class FolderBusy(UsageError):
    """Another facegen process holds the output folder's lock, or took it over during this run."""


class OutOfSpace(UsageError):
    """The disk or quota is full; what was complete is kept and the rerun resumes once there is room."""


class RankLost(UsageError):
    """Another process of this distributed build failed or stopped giving signs of life: this one stops too; what
    is complete is kept and a rerun resumes."""


class SampleError(FacegenError):
    """One sample is unusable. Under --strict this stops the run; otherwise it is skipped and counted."""

    def __init__(self, ref: str, reason: str):
        super().__init__(f"{ref}: {reason}")
        self.ref = ref
        self.reason = reason


class CheckFailed(FacegenError):
    """A check the command exists to make failed: the folder is not fit to publish, a rebuild differs."""


class RemoteError(FacegenError):
    """A remote service failed or sent something else than published (the Hub, a download server)."""


# How to install what `report`'s plots and `--recognizer dlib` need: the README's install (a checkout), or an index.
REPORT_EXTRA_INSTALL = ("`pip install -e \".[report]\"` in a facegen checkout, `pip install 'facegen[report]'` "
                        "from an index")


def server_failed(exc: BaseException) -> bool:
    """Whether a remote call's exception is the server's failure answer (5xx, or 429 too many requests): a
    RemoteError, exit 1. No answer at all (no network, refused, offline mode) means the environment must change, and
    a 4xx (no such repo or file, no access) the input or the token: UsageError, exit 2."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)
