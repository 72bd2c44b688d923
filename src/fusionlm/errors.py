"""The mistakes fusionlm reports as the caller's: bad input, named with what to do.

Every check of what fusionlm is given (a file, a config, an option, a prompt, a tensor of the
wrong shape) raises ``InvalidInputError``. It is a ``ValueError``, so code that catches
``ValueError`` (and every documented ``Raises: ValueError``) holds; the command line tells it
apart from a bug: an ``InvalidInputError`` (or an ``OSError``, such as a missing file) is one
line and exit status 2, anything else an internal error (exit status 1).
"""

from __future__ import annotations


class FusionlmError(Exception):
    """A mistake in what fusionlm was given, with a message that names it."""


class InvalidInputError(FusionlmError, ValueError):
    """Input fusionlm cannot use: a malformed file, an unsupported option, a bad value."""


__all__ = ["FusionlmError", "InvalidInputError"]
