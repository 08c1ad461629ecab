"""The one error type of the upscaler package."""

from __future__ import annotations


class UpscalerError(ValueError):
    """An upscaler that cannot be used as asked: unknown name, unreadable file, bad size.

    Messages about a file start with its path, so the UI and API can show them as they are.
    """
