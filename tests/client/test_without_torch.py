"""``lmforge.client`` in a virtual environment that has only httpx, pydantic and what they need
(no torch, numpy, transformers or FastAPI): it imports, and it completes, streams and lists models
against the session server, with the same text as in this process.

The environment is built offline: ``python -m venv --without-pip``, then links to the installed
distributions of httpx and pydantic and their requirements (read from their metadata), and to
this checkout's ``lmforge`` package."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lmforge.client import ChatCompletion, Completion, configure

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, json, sys

try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("torch is importable in the bare environment")

from lmforge.client import ChatCompletion, Completion, Model, configure

configure(base_url=sys.argv[1])
model = Model.list().model_endpoints[0].name
text = Completion.create(model, "The quick brown fox", max_new_tokens=6, temperature=0).output.text
chat = "".join(p.output.text for p in ChatCompletion.create(
    model, [{"role": "user", "content": "Hi"}], max_new_tokens=5, temperature=0, stream=True))
async_text = asyncio.run(Completion.acreate(model, "The quick brown fox", max_new_tokens=6,
                                            temperature=0)).output.text
outside = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")}
                 - set(sys.stdlib_module_names))
print(json.dumps({"model": model, "text": text, "chat": chat, "async_text": async_text,
                  "outside_stdlib": outside}))
"""


def closure(*names: str) -> dict[str, metadata.Distribution]:
    """The installed distributions ``names`` need, by normalized name (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in found:
            continue
        dist = found[name] = metadata.distribution(name)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def top_level(dist: metadata.Distribution) -> set[str]:
    """The names a distribution installs at the top of site-packages (packages, modules,
    extension modules, its .dist-info)."""
    return {Path(str(f)).parts[0] for f in dist.files or []
            if not str(f).startswith("..") and Path(str(f)).parts[0] != "__pycache__"}


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> tuple[Path, set[str]]:
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    installed = Path(sysconfig.get_paths()["purelib"])
    # site's own hooks, which some interpreters ship (Debian's python3 has a sitecustomize):
    # imported at start-up by every program, not by the client
    allowed = {"lmforge", "sitecustomize", "usercustomize"}
    for dist in closure("httpx", "pydantic").values():
        for name in top_level(dist):
            (site / name).symlink_to(installed / name)
            allowed.add(name.removesuffix(".py").split(".")[0])
    (site / "lmforge").symlink_to(ROOT / "lmforge")
    return python, allowed


def test_the_client_works_with_only_httpx_and_pydantic(bare_python, base_url, model):
    python, allowed = bare_python
    run = subprocess.run([str(python), "-I", "-c", SCRIPT, base_url], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert "torch" not in allowed and "numpy" not in allowed
    assert set(seen["outside_stdlib"]) <= allowed, seen["outside_stdlib"]
    assert "lmforge" in seen["outside_stdlib"] and "httpx" in seen["outside_stdlib"]

    configure(base_url=base_url)
    try:
        here = Completion.create(model, "The quick brown fox", max_new_tokens=6, temperature=0)
        chat = ChatCompletion.create(model, [{"role": "user", "content": "Hi"}],
                                     max_new_tokens=5, temperature=0)
    finally:
        configure()
    assert seen["model"] == model
    assert seen["text"] == seen["async_text"] == here.output.text
    assert seen["chat"] == chat.output.text
