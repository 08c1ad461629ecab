"""Who may call the API: HTTP Basic logins (``--api-auth``), browser origins (``--cors-allow-origins``,
``--cors-allow-origins-regex``) and the warning printed when the server is reachable by others
without a login. Flag names and behaviour follow A1111's ``modules/api/api.py`` and
``modules/initialize_util.py``."""

from __future__ import annotations

import logging
import re
from secrets import compare_digest
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

log = logging.getLogger("studio.api")


def parse_credentials(text: str | None) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` → ``{user: pass}``. A password may contain ":" (the first one
    separates it from the user name), not ",". Raises ValueError for an entry without a password."""
    creds: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth expects user:password pairs separated by commas, got {item!r}")
        creds[user] = password
    return creds


def basic_auth_dependency(creds: dict[str, str]) -> Callable[..., str]:
    """A FastAPI dependency that lets a request through only with one of ``creds``; otherwise a
    401 with ``WWW-Authenticate: Basic``, as A1111 answers. Every pair is compared in constant
    time, so the reply time tells nothing about which part was wrong."""
    encoded = [(user.encode("utf-8"), password.encode("utf-8")) for user, password in creds.items()]
    scheme = HTTPBasic(auto_error=False, description="--api-auth logins")

    def check(credentials: HTTPBasicCredentials | None = Depends(scheme)) -> str:
        if credentials is not None:
            user = credentials.username.encode("utf-8")
            password = credentials.password.encode("utf-8")
            ok = False
            for known_user, known_password in encoded:
                ok |= compare_digest(user, known_user) & compare_digest(password, known_password)
            if ok:
                return credentials.username
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def add_outer_middleware(app: FastAPI, cls: Any, **options: Any) -> None:
    """Put ``cls`` outside every other middleware of ``app``, also once the app serves requests.

    Gradio builds its app (and its own CORS middleware) inside ``launch()``, and Starlette refuses
    ``add_middleware`` after the first request. As A1111 does for the same reason, the middleware
    goes into ``user_middleware`` and the stack is rebuilt; requests in flight finish on the old
    stack, later ones go through the new one."""
    app.user_middleware.insert(0, Middleware(cls, **options))
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()


def cors_options(flags: Any) -> dict[str, Any] | None:
    """CORSMiddleware options from the flags, or None when no origin is allowed (no CORS headers
    at all: browsers then keep other sites' pages from calling the API)."""
    origins = [o.strip() for o in (flags.cors_allow_origins or "").split(",") if o.strip()]
    regex = flags.cors_allow_origins_regex or None
    if not origins and not regex:
        return None
    return {"allow_origins": origins, "allow_origin_regex": regex, "allow_methods": ["*"],
            "allow_headers": ["*"], "allow_credentials": True}


def check_flags(flags: Any) -> dict[str, str]:
    """The --api-auth logins; exits with a message for a malformed --api-auth or
    --cors-allow-origins-regex (app.py calls this before starting anything)."""
    try:
        creds = parse_credentials(flags.api_auth)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if flags.cors_allow_origins_regex:
        try:
            re.compile(flags.cors_allow_origins_regex)
        except re.error as e:
            raise SystemExit(f"--cors-allow-origins-regex is not a valid regular expression: {e}") from None
    return creds


def install_access(app: FastAPI, flags: Any) -> list[Any]:
    """CORS on ``app`` if the flags ask for it, the exposure warning, and the dependencies that
    every API router must get (the Basic-auth check with ``--api-auth``)."""
    creds = check_flags(flags)
    options = cors_options(flags)
    if options is not None:
        add_outer_middleware(app, CORSMiddleware, **options)
        log.info("CORS: allowing origins %s", ", ".join(filter(None, [*options["allow_origins"],
                                                                     options["allow_origin_regex"]])))
    if (flags.listen or flags.share) and not creds:
        log.warning("Serving beyond this machine (--listen/--share) without --api-auth: anyone who can "
                    "reach the port can use the REST API at /sdapi/v1.")
    return [Depends(basic_auth_dependency(creds))] if creds else []
