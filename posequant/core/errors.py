"""User-facing errors.

Every mistake a user can make (a bad path, a damaged checkpoint, a wrong option) raises a
subclass of :class:`PosequantError` whose message is one line: what went wrong, where, and
what to do. The CLI catches them once and prints that line; library users catch them too.
Programmer errors stay ordinary exceptions (and tracebacks).
"""


class PosequantError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2


class CheckpointError(PosequantError):
    """The checkpoint file is missing, unreadable, or holds something we cannot use."""


class ArchitectureError(PosequantError):
    """The weights do not match a known (or the given) architecture."""


class ExportError(PosequantError):
    """Export, simplification or writing the ONNX file failed."""


class VerificationError(PosequantError):
    """The exported model disagrees with PyTorch beyond tolerance."""

    exit_code = 1


class DataError(PosequantError):
    """A dataset, annotation file or image is missing or malformed."""


class MetadataError(PosequantError):
    """An ONNX model lacks the posequant metadata a stage needs."""


class MissingMetadataError(MetadataError):
    """The model carries no posequant metadata at all (a third-party export): options may stand in.

    Damaged metadata, or a graph that disagrees with it, is a plain :class:`MetadataError`, never this.
    """


class PosequantWarning(UserWarning):
    """Something the user should know that does not stop the work (skipped images, a fallback)."""
