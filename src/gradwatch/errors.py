"""The one exception type users see: a sentence that says what is wrong and what to do."""

from __future__ import annotations


class GradwatchError(Exception):
    """Bad input or a broken run directory.

    The message is meant to be shown as-is, without a traceback: it names the offending value and
    the way out.
    """


class RunDirError(GradwatchError):
    """A run directory that is missing, empty, truncated beyond repair, or not gradwatch's."""


class GuardStop(GradwatchError):
    """A guard gave up on purpose (e.g. every step non-finite): training cannot usefully go on. The
    same class for PyTorch's guards and the optax ones."""
