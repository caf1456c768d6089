"""One exception type for bad input, so the CLI can print one clear line instead of a traceback."""


class EAGRLInputError(ValueError):
    """Bad user input: a missing file, a missing column, a wrong value, an empty cohort.

    The message names the file, column or key, and says what was expected.
    """
