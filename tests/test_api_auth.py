"""Who may use a running studio: --api-auth (HTTP Basic on every API route), --gradio-auth (the UI's
login), --cors-allow-origins (browser origins), the exposure warning and --api-server-stop."""

from __future__ import annotations

import logging
import time

import pytest
import requests

from studio.api.auth import check_flags, install_access, parse_credentials
from studio.config import parse_flags

AUTH = ("user", "secret")
SMALL = {"prompt": "a locked door", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}


def wait_ready(srv, auth=None, timeout: float = 120) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if srv.proc.poll() is not None:
            raise RuntimeError("server exited:\n" + (srv.data_dir / "server.log").read_text())
        try:
            if requests.get(srv.url + "/sdapi/v1/samplers", auth=auth, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not start:\n" + (srv.data_dir / "server.log").read_text())


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from tests.helpers import Server, make_models_dir

    root = tmp_path_factory.mktemp("secured")
    make_models_dir(root)
    srv = Server(root, "--api-auth", "user:secret,bot:pa:ss", "--gradio-auth", "admin:pw",
                 "--cors-allow-origins", "http://example.com,http://other.example")
    try:
        wait_ready(srv, AUTH)
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("method,path,body", [
    ("get", "/sdapi/v1/sd-models", None),
    ("get", "/sdapi/v1/options", None),
    ("post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1}),
    ("post", "/sdapi/v1/txt2img", SMALL),
    ("get", "/sdapi/v1/progress", None),
    ("post", "/sdapi/v1/interrupt", None),
    ("get", "/sdapi/v1/cmd-flags", None),
    ("get", "/controlnet/model_list", None),
    ("post", "/sdapi/v1/create/hypernetwork", {"name": "nope"}),
])
def test_every_api_route_needs_the_login(secured, method, path, body):
    url = secured.url + path
    for auth in (None, ("user", "wrong"), ("nobody", "secret"), ("user", ""), ("bot", "pa"), ("USER", "secret")):
        r = getattr(requests, method)(url, json=body, auth=auth, timeout=30)
        assert r.status_code == 401, (auth, r.text)
        assert r.headers["WWW-Authenticate"] == "Basic"
        assert r.json()["detail"] == "Incorrect username or password"
    r = requests.get(secured.url + "/sdapi/v1/samplers", auth=("bot", "pa:ss"), timeout=30)
    assert r.status_code == 200  # a password may contain ":"


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_right_login_generates_and_flags_hide_secrets(secured):
    r = requests.post(secured.url + "/sdapi/v1/txt2img", json=SMALL, auth=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    flags = requests.get(secured.url + "/sdapi/v1/cmd-flags", auth=AUTH, timeout=10).json()
    assert flags["api_auth"] == "***" and flags["gradio_auth"] == "***"
    assert flags["cors_allow_origins"] == "http://example.com,http://other.example"


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_webuiapi_with_set_auth(secured):
    webuiapi = pytest.importorskip("webuiapi")
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=secured.port)
    with pytest.raises(RuntimeError, match="401"):
        anonymous.txt2img(prompt="x", width=64, height=64, steps=2)
    c = webuiapi.WebUIApi(host="127.0.0.1", port=secured.port, username="user", password="secret")
    result = c.txt2img(prompt="a key", width=64, height=64, steps=2, seed=8, sampler_name="Euler")
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [8]
    assert any(t.startswith("tiny-sd1") for t in c.util_get_model_names())
    wrong = webuiapi.WebUIApi(host="127.0.0.1", port=secured.port)
    wrong.set_auth("user", "guess")
    with pytest.raises(RuntimeError, match="401"):
        wrong.txt2img(prompt="x", width=64, height=64, steps=2)


def test_docs_stay_readable_and_show_the_login_scheme(secured):
    # as in A1111: the docs are public, the calls are not
    assert requests.get(secured.url + "/docs", timeout=10).status_code == 200
    schema = requests.get(secured.url + "/openapi.json", timeout=10).json()
    assert "/sdapi/v1/txt2img" in schema["paths"] and "/sdapi/v1/face-restorers" in schema["paths"]
    assert any(s.get("scheme") == "basic" for s in schema["components"]["securitySchemes"].values())


def test_gradio_auth_guards_the_ui(secured):
    assert requests.get(secured.url + "/config", timeout=10).status_code == 401
    # the API login does not open the UI, and a wrong UI password is refused
    assert requests.get(secured.url + "/config", auth=AUTH, timeout=10).status_code == 401
    assert requests.post(secured.url + "/login", data={"username": "admin", "password": "bad"},
                         timeout=10).status_code >= 400
    session = requests.Session()
    assert session.post(secured.url + "/login", data={"username": "admin", "password": "pw"},
                        timeout=10).status_code == 200
    assert session.get(secured.url + "/config", timeout=10).status_code == 200


def preflight(server, origin: str) -> requests.Response:
    return requests.options(server.url + "/sdapi/v1/txt2img", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_allows_the_listed_origins_only(secured):
    for origin in ("http://example.com", "http://other.example"):
        r = preflight(secured, origin)
        assert r.status_code == 200
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = preflight(secured, "http://evil.example")
    assert "Access-Control-Allow-Origin" not in r.headers
    # the real request carries the header too (and still needs the login)
    r = requests.get(secured.url + "/sdapi/v1/samplers", auth=AUTH, headers={"Origin": "http://example.com"},
                     timeout=10)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "http://example.com"
    r = requests.get(secured.url + "/sdapi/v1/samplers", auth=AUTH, headers={"Origin": "http://evil.example"},
                     timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers


def test_no_cors_without_the_flag(server):
    r = preflight(server, "http://example.com")
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.get(server.url + "/sdapi/v1/samplers", headers={"Origin": "http://example.com"}, timeout=10)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_server_stop_with_the_flag(tmp_path):
    from tests.helpers import Server, make_models_dir

    make_models_dir(tmp_path)
    srv = Server(tmp_path, "--nowebui", "--api-server-stop", "--api-auth", "user:secret",
                 "--skip-load-model-at-start")
    try:
        wait_ready(srv, AUTH)
        assert requests.post(srv.url + "/sdapi/v1/server-stop", timeout=10).status_code == 401
        r = requests.post(srv.url + "/sdapi/v1/server-restart", auth=AUTH, timeout=10)
        assert r.status_code == 501 and "server-stop" in r.json()["detail"]
        r = requests.post(srv.url + "/sdapi/v1/server-stop", auth=AUTH, timeout=10)
        assert r.status_code == 200 and r.text == "Stopping."
        srv.proc.wait(40)
        assert "server-stop" in (tmp_path / "server.log").read_text()
    finally:
        srv.stop()


# -- without a server -----------------------------------------------------------------------------


def test_parse_credentials():
    assert parse_credentials("a:b, c:d:e ,") == {"a": "b", "c": "d:e"}
    assert parse_credentials(None) == {}
    for bad in ("justuser", "user:", ":pass"):
        with pytest.raises(ValueError, match="user:password"):
            parse_credentials(bad)


def test_exposure_warning_and_cors_setup(caplog):
    from fastapi import FastAPI

    with caplog.at_level(logging.WARNING, logger="studio.api"):
        assert install_access(FastAPI(), parse_flags(["--listen"])) == []
    assert "without --api-auth" in caplog.text
    caplog.clear()
    app = FastAPI()
    with caplog.at_level(logging.WARNING, logger="studio.api"):
        deps = install_access(app, parse_flags(["--share", "--api-auth", "u:p", "--cors-allow-origins-regex",
                                                r"https://.*\.example\.com"]))
    assert len(deps) == 1 and "without --api-auth" not in caplog.text
    assert [m.cls.__name__ for m in app.user_middleware] == ["CORSMiddleware"]
    assert app.user_middleware[0].kwargs["allow_origin_regex"] == r"https://.*\.example\.com"
    assert install_access(FastAPI(), parse_flags([])) == []
    with pytest.raises(SystemExit, match="user:password"):
        install_access(FastAPI(), parse_flags(["--api-auth", "nopassword"]))


def test_bad_access_flags_stop_the_start():
    assert check_flags(parse_flags(["--api-auth", "a:b,c:d"])) == {"a": "b", "c": "d"}
    with pytest.raises(SystemExit, match="regular expression"):
        check_flags(parse_flags(["--cors-allow-origins-regex", "(unclosed"]))
    with pytest.raises(SystemExit, match="user:password"):
        check_flags(parse_flags(["--api-auth", "user"]))
