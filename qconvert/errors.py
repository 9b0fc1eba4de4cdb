"""The one exception type users see.

Everything that is the user's input's fault (a corrupt file, an unknown architecture, a
shape a block type cannot hold, a wrong option) raises :class:`QConvertError` with one
sentence that says what is wrong and, where possible, what to do. The CLI prints that
sentence and exits non-zero; any other exception is a bug in qconvert.
"""


class QConvertError(Exception):
    """A problem with the user's input or options, explained in one sentence."""

    exit_code = 1


class QualityGateError(QConvertError):
    """An evaluation exceeded a threshold the user asked for (``--max-kld`` ...)."""

    exit_code = 3
