"""Errors caused by the user's input. The CLI prints them as one line, ``error: <what>: <why>``,
and exits with status 2; the Python API raises them as ordinary exceptions."""


class MaskRCNNError(Exception):
    """Bad input: a file that is missing, unreadable or malformed, a config that does not
    fit, weights whose shapes do not match. The message names the thing and the problem."""


class WeightsError(MaskRCNNError):
    """A weights file that cannot be read or does not fit the model's config."""


class DataError(MaskRCNNError):
    """An image or annotation file that cannot be used."""
