"""The error every layer raises for bad input from a user or a client. It lives in a module of its
own so that any module (prompts, networks, generation, the settings) can raise it without
importing the request schema: the UI shows its text, the API answers it with a 4xx."""

from __future__ import annotations


class RequestError(ValueError):
    """Bad input from a user or client: shown in the UI, a 4xx in the API."""


class UnknownScriptError(RequestError):
    """A ``script_name`` or an ``alwayson_scripts`` entry the studio does not have: A1111 answers 422."""

    status = 422
