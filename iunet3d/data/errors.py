"""The one exception type for bad data input; the CLI prints it as one line."""


class DataError(ValueError):
    """Bad input data: the message names the file, case or key and what was expected."""
