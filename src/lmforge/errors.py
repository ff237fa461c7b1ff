"""User-facing errors: one line that names the file/key and what to do; the CLI exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a key, a value). The CLI prints `error: <message>` and exits 2.

    The message must be one line naming the offending file/line/key and what to do about it.
    """

    exit_code = 2


class TrainingFailed(Exception):
    """Training stopped for a reason that is not bad input (e.g. a non-finite loss). Exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """The user pressed Ctrl-C (or the job got SIGTERM); state was saved. Exit code 130."""

    exit_code = 130
