"""lmforge's compiled CPU kernels (``lmforge/csrc``), built once per machine and cached.

``quant_ext()`` compiles ``csrc/*.cpp`` (the quantized linear layer and the fused decode step)
with ``torch.utils.cpp_extension`` (the compiler on the PATH, ``-O3 -march=native``, OpenMP so that ``at::parallel_for`` uses PyTorch's
own thread pool) into ``$LMFORGE_CACHE/ext/<key>/`` and imports it; later processes import the
built module directly (~10 ms). The key hashes the source, the PyTorch and Python versions and
this CPU's instruction-set flags, since the CPU model can change under the same cache.

Where there is no compiler, or the build fails, or ``LMFORGE_NO_COMPILE=1``, it returns None
with the reason, and the model runs its pure-PyTorch path (``LoadedModel.kernels`` says which).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from lmforge.config import lmforge_cache

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def sources() -> list[Path]:
    """The extension's C++ files, sorted: its ``.cpp`` files and the headers they include."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def cpu_flags() -> str:
    """This CPU's instruction-set flags (``/proc/cpuinfo``), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def build_key(march: str = "native") -> str:
    """16 hex digits naming this build: the source, PyTorch, Python, this CPU's flags and the
    target (``-march``)."""
    code = "\0".join(p.name + "\0" + p.read_text() for p in sources())
    raw = "\0".join((code, torch.__version__, sys.version, cpu_flags(), march))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def quant_ext(march: str = "native") -> tuple[ModuleType | None, str]:
    """(the compiled quantized-linear module or None, why it is None: "" when it loaded).

    ``march``: the compiler's ``-march``; ``native`` serves, the tests also build ``haswell``
    (AVX2) and ``x86-64`` (no vector path) to check the kernel's other code paths here.
    """
    if os.environ.get("LMFORGE_NO_COMPILE") == "1":
        return None, "LMFORGE_NO_COMPILE=1"
    key = build_key(march)
    name = f"lmforge_quant_{key}"
    build_dir = lmforge_cache() / "ext" / key
    built = build_dir / f"{name}.so"
    if built.is_file():
        try:
            return _import(name, built), ""
        except ImportError as e:
            logger.warning("rebuilding %s: %s", built, e)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler}) on the PATH"
    try:
        return _build(name, build_dir, march), ""
    except Exception as e:  # compiler errors, a missing ninja, an unwritable cache
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        logger.warning("could not build the quantized kernels: %s", e)
        return None, f"the kernel build failed ({first[:120]})"


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, build_dir: Path, march: str) -> ModuleType:
    from torch.utils import cpp_extension

    try:  # the ninja wheel: its binary is not on the PATH of an unactivated venv
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir):
        built = build_dir / f"{name}.so"
        if built.is_file():  # another process built it while this one waited
            return _import(name, built)
        logger.info("compiling lmforge's quantized CPU kernels into %s (once per machine)",
                    build_dir)
        return cpp_extension.load(
            name=name, sources=[str(p) for p in sources() if p.suffix == ".cpp"],
            build_directory=str(build_dir),
            extra_cflags=["-O3", f"-march={march}", "-fopenmp"], verbose=False)


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """One build at a time per directory, across processes, and no wait on a dead builder.

    ``cpp_extension.load`` guards a build with a ``lock`` file that only a finishing build
    removes: a build killed midway (Ctrl-C during the first start) leaves it, and every later
    build of that directory then waits for it forever. This lock is an ``flock``, which the
    kernel releases when its holder dies; whoever holds it is the only builder alive, so a
    ``lock`` file it finds is stale and is removed.
    """
    import fcntl

    with open(build_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)  # torch's FileBaton, stale
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
