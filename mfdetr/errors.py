"""The one exception type users see: a message that names the culprit and what to do."""


class MfdetrError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    Messages name the file, image id, annotation id or field at fault, and say what to do.
    """
