"""The pipeline's own error, apart from ``endpoint.py`` so that the CLI can catch it without
importing the ``openai`` SDK (half a second of every ``lmforge`` command's start)."""


class PipelineError(RuntimeError):
    """A stage cannot go on: every request failed, or a batch failed as a whole (the message
    has the server's words)."""
