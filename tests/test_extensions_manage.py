"""Managing extensions: enable/disable live, install from a git URL, the A1111-shaped list, the tab."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from studio.controlnet.preprocessors import PreprocessorRegistry
from studio.extensions import ExtensionError, ExtensionManager

MIRROR = '''
from PIL import ImageOps

def register(api):
    api.add_preprocessor("mirror", lambda image, resolution, a, b, **ctx: ImageOps.mirror(image))
'''
FLIP = '''
from PIL import ImageOps

def register(api):
    api.add_preprocessor("flip_it", lambda image, resolution, a, b, **ctx: ImageOps.flip(image))
'''
GIT_ID = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]


def write(folder: Path, name: str, code: str) -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "extension.py").write_text(code)
    return folder / name


class Saved:
    """A settings stand-in: what ``disabled`` reads is what ``save_disabled`` wrote."""

    def __init__(self, names=()):
        self.names = list(names)
        self.calls: list[list[str]] = []

    def get(self) -> list[str]:
        return list(self.names)

    def save(self, names: list[str]) -> None:
        self.calls.append(list(names))
        self.names = list(names)


def manager(tmp_path: Path, saved: Saved | None = None) -> tuple[ExtensionManager, Saved]:
    saved = saved or Saved()
    folders = [tmp_path / "shipped", tmp_path / "data" / "extensions"]
    m = ExtensionManager(folders, PreprocessorRegistry(tmp_path / "annotators"), saved.get, saved.save)
    m.load_all()
    return m, saved


def git_repo(tmp_path: Path, name: str, code: str, branch: str = "main") -> Path:
    repo = tmp_path / "remotes" / name
    repo.mkdir(parents=True)
    (repo / "extension.py").write_text(code)
    subprocess.run(["git", "-c", f"init.defaultBranch={branch}", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "extension.py"], check=True)
    subprocess.run(["git", "-C", str(repo), *GIT_ID, "commit", "-q", "-m", "first"], check=True)
    return repo


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_disable_unregisters_live_and_persists(tmp_path):
    write(tmp_path / "shipped", "mirror", MIRROR)
    m, saved = manager(tmp_path)
    assert "mirror" in m.registry
    info = m.set_enabled("mirror", False)
    assert (info.status, info.enabled, info.preprocessors) == ("disabled", False, [])
    assert "mirror" not in m.registry
    assert saved.calls == [["mirror"]]
    # the next start reads the saved list
    again, _ = manager(tmp_path, saved)
    assert [(e.name, e.status) for e in again.extensions] == [("mirror", "disabled")]


def test_enable_loads_and_registers_now(tmp_path):
    write(tmp_path / "shipped", "mirror", MIRROR)
    m, saved = manager(tmp_path, Saved(["mirror", "gone_for_now"]))
    assert "mirror" not in m.registry
    info = m.set_enabled("mirror", True)
    assert (info.status, info.enabled, info.preprocessors, info.error) == ("loaded", True, ["mirror"], None)
    assert m.registry.get("mirror").source == "mirror"
    assert saved.calls == [["gone_for_now"]]  # a saved name of an absent extension is kept
    m.set_enabled("mirror", False)
    m.set_enabled("mirror", True)  # enabling again re-imports and registers without a clash
    assert m.get("mirror").status == "loaded" and "mirror" in m.registry


def test_enabling_a_broken_extension_records_the_error(tmp_path):
    write(tmp_path / "shipped", "broken", "def register(api):\n    raise RuntimeError('boom')\n")
    m, _ = manager(tmp_path, Saved(["broken"]))
    info = m.set_enabled("broken", True)
    assert info.status == "error" and "boom" in info.error and info.enabled


def test_unknown_extension_is_an_error(tmp_path):
    m, saved = manager(tmp_path)
    with pytest.raises(ExtensionError, match="unknown extension 'nope'"):
        m.set_enabled("nope", True)
    with pytest.raises(ExtensionError, match="nope"):
        m.apply({"nope"})
    assert saved.calls == []


def test_apply_sets_every_state_and_persists_once(tmp_path):
    write(tmp_path / "shipped", "mirror", MIRROR)
    write(tmp_path / "shipped", "flip", FLIP)
    m, saved = manager(tmp_path, Saved(["flip"]))
    m.apply({"flip"})
    assert {e.name: e.status for e in m.extensions} == {"flip": "loaded", "mirror": "disabled"}
    assert "flip_it" in m.registry and "mirror" not in m.registry
    assert saved.calls == [["mirror"]]


def test_install_refused_when_not_allowed(tmp_path):
    repo = git_repo(tmp_path, "flipper", FLIP)
    m, _ = manager(tmp_path)
    with pytest.raises(ExtensionError, match="--enable-insecure-extension-access") as e:
        m.install_from_url(repo.as_uri(), allowed=False)
    assert "extension access disabled because of command line flags" in str(e.value)
    assert not (tmp_path / "data" / "extensions" / "flipper").exists()


def test_install_from_a_git_url(tmp_path):
    repo = git_repo(tmp_path, "flipper", FLIP, branch="trunk")
    m, _ = manager(tmp_path)
    info = m.install_from_url(repo.as_uri() + "/", allowed=True)
    target = tmp_path / "data" / "extensions" / "flipper"
    assert info.name == "flipper" and info.path == target and (target / "extension.py").is_file()
    assert info.status == "loaded" and "flip_it" in m.registry
    assert [p.name for p in target.parent.iterdir()] == ["flipper"]  # no temporary folder left
    [entry] = m.api_list()
    assert entry["name"] == "flipper" and entry["remote"] == repo.as_uri() + "/"
    assert entry["commit_hash"] == head(repo) and entry["version"] == head(repo)[:8]
    assert entry["branch"] == "trunk" and int(entry["commit_date"]) > 0
    assert (entry["enabled"], entry["status"], entry["error"], entry["preprocessors"]) == (
        True, "loaded", None, ["flip_it"])
    with pytest.raises(ExtensionError, match="already installed"):
        m.install_from_url(repo.as_uri(), allowed=True)
    # a fresh manager finds it again
    again, _ = manager(tmp_path)
    assert [(e.name, e.status) for e in again.extensions] == [("flipper", "loaded")]


def test_install_with_folder_name_and_branch(tmp_path):
    repo = git_repo(tmp_path, "flipper.git", FLIP)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "-b", "dev"], check=True)
    (repo / "extension.py").write_text(MIRROR)
    subprocess.run(["git", "-C", str(repo), *GIT_ID, "commit", "-q", "-am", "dev"], check=True)
    m, _ = manager(tmp_path)
    assert m.install_from_url(repo.as_uri(), allowed=True, branch="main").name == "flipper"
    info = m.install_from_url(repo.as_uri(), allowed=True, dirname="mirror_dev", branch="dev")
    assert info.preprocessors == ["mirror"]
    assert m.api_list()[1]["branch"] == "dev"


def test_install_of_a_repo_without_entry_point_is_reported(tmp_path):
    repo = git_repo(tmp_path, "a1111-style", "")
    subprocess.run(["git", "-C", str(repo), "mv", "extension.py", "install.py"], check=True)
    subprocess.run(["git", "-C", str(repo), *GIT_ID, "commit", "-q", "-m", "no entry"], check=True)
    m, _ = manager(tmp_path)
    info = m.install_from_url(repo.as_uri(), allowed=True)
    assert info.status == "error" and "register(api)" in info.error and "scripts/" in info.error
    again, _ = manager(tmp_path)  # still listed after a restart, with the reason
    assert [(e.name, e.status) for e in again.extensions] == [("a1111-style", "error")]


def test_same_name_as_a_shipped_extension_is_already_installed(tmp_path):
    write(tmp_path / "shipped", "flipper", MIRROR)
    repo = git_repo(tmp_path, "flipper", FLIP)
    m, _ = manager(tmp_path)
    with pytest.raises(ExtensionError, match="already installed"):
        m.install_from_url(repo.as_uri(), allowed=True)


@pytest.mark.parametrize("url, dirname, message", [
    ("", None, "no URL"),
    ("   ", None, "no URL"),
    ("ftp://example.com/x.git", None, "not a git URL"),
    ("--upload-pack=touch /tmp/x", None, "not a git URL"),
    ("ext::sh -c touch% /tmp/pwned", None, "not a git URL"),
    ("https://example.com/", None, "folder name"),
    ("https://example.com/repo.git", "../escape", "invalid folder name"),
    ("https://example.com/repo.git", ".hidden", "invalid folder name"),
    ("https://example.com/.git", None, "folder name"),
])
def test_bad_urls_and_names_are_refused(tmp_path, url, dirname, message):
    m, _ = manager(tmp_path)
    with pytest.raises(ExtensionError, match=message):
        m.install_from_url(url, allowed=True, dirname=dirname)
    assert not (tmp_path / "data" / "extensions").exists() or not any((tmp_path / "data" / "extensions").iterdir())


def test_failed_clone_leaves_nothing_behind(tmp_path):
    m, _ = manager(tmp_path)
    with pytest.raises(ExtensionError, match="git clone failed"):
        m.install_from_url((tmp_path / "does-not-exist").as_uri(), allowed=True)
    assert list((tmp_path / "data" / "extensions").iterdir()) == []
    assert m.extensions == []


def test_api_list_of_a_plain_folder(tmp_path):
    write(tmp_path / "shipped", "mirror", MIRROR)
    m, _ = manager(tmp_path)
    assert m.api_list() == [{"name": "mirror", "remote": None, "branch": None, "commit_hash": None,
                             "commit_date": None, "version": "", "enabled": True, "status": "loaded",
                             "error": None, "preprocessors": ["mirror"]}]


# ---------------------------------------------------------------------------------------------
# the tab


def fake_studio(tmp_path: Path, allowed: bool):
    m, saved = manager(tmp_path)
    return SimpleNamespace(extensions=m, flags=SimpleNamespace(extension_install_allowed=allowed),
                           settings=SimpleNamespace(get=lambda k, d=None: d, update=lambda values: None))


def test_tab_builds_and_refuses_install_when_not_allowed(tmp_path):
    from studio.ui.extensions_tab import build_extensions_tab, install_extension

    write(tmp_path / "shipped", "broken", "def register(api):\n    raise RuntimeError('kaput')\n")
    studio = fake_studio(tmp_path, allowed=False)
    with gr.Blocks() as blocks:
        with gr.Tab("Extensions"):
            build_extensions_tab(studio)
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("extensions_table", "extensions_apply", "extensions_result", "extensions_enabled",
                    "extension_install_url", "extension_install_button", "extension_install_result"):
        assert elem_id in by_id, elem_id
    assert by_id["extension_install_button"].interactive is False
    assert by_id["extension_install_url"].interactive is False
    assert "kaput" in str(by_id["extensions_table"].value)  # a broken extension's error is visible

    repo = git_repo(tmp_path, "flipper", FLIP)
    message, table, enabled = install_extension(studio, repo.as_uri(), "", "")
    assert "--enable-insecure-extension-access" in message and "Error" in message
    assert "flipper" not in str(table)


def test_tab_handlers_install_and_apply(tmp_path):
    from studio.ui.extensions_tab import apply_extensions, install_extension

    studio = fake_studio(tmp_path, allowed=True)
    message, _, _ = install_extension(studio, "not a url", None, None)
    assert message.startswith("**Error:**")
    message, table, enabled = install_extension(studio, git_repo(tmp_path, "flipper", FLIP).as_uri(), "", "")
    assert "Installed **flipper**" in message and "flip_it" in message
    assert "<tr class='ext-loaded'><td>flipper</td><td>loaded</td><td>flip_it</td>" in table
    assert enabled["choices"] == ["flipper"] and enabled["value"] == ["flipper"]
    message, table, enabled = apply_extensions(studio, [])
    assert "Disabled: flipper" in message and "<td>flipper</td><td>disabled</td>" in table
    assert enabled["value"] == []
    assert "flip_it" not in studio.extensions.registry
    message, _, _ = apply_extensions(studio, ["ghost"])
    assert message.startswith("**Error:**") and "ghost" in message
