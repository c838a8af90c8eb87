"""The errors a user can cause, in one leaf module (it imports nothing from ``dqo``), so that
the command lines can turn each into one line and exit code 2 without importing the library."""


class UsageError(ValueError):
    """A user's mistake: a value out of range, a missing file, too many bad rows."""


class DataError(ValueError):
    """A row that cannot be used; the message names the file, line and field."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from; the message names the paths."""


class RewardError(ValueError):
    """A reward function that cannot be loaded, fails, or returns something that is not one
    number a completion; the message names the function (and the row)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite gradients step after step); the message says why."""


class CheckerError(RuntimeError):
    """The answer checker itself cannot run (math-verify missing, workers that cannot start):
    never read as wrong answers."""


# what a command line reports as one line (exit code 2) instead of a traceback
USER_ERRORS = (UsageError, DataError, CheckpointError, CheckerError)
