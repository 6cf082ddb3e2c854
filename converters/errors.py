"""The errors edgeconvert raises on purpose.

edgeconvert is a build-side tool shipped next to the agent but independent of it, so it keeps
its own two-class hierarchy instead of importing the agent's. Third-party exceptions
(onnx, onnxruntime, TensorFlow, LiteRT) are translated where they enter, with
``raise ... from exc``; the CLI prints the message and exits with :attr:`ConvertError.exit_code`.
"""

from __future__ import annotations


class ConvertError(Exception):
    """A conversion, quantisation or validation step failed (exit status 1)."""

    #: Exit status the CLI uses when this error ends a command.
    exit_code = 1


class InputError(ConvertError):
    """Bad usage or bad input: a file that is not a model, samples that do not fit (exit 2)."""

    exit_code = 2
