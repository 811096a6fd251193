"""Stage 3, nuitka: Nuitka's pure-Python package with csrc/static/nuitka-*.patch."""

from __future__ import annotations

from pathlib import Path

from . import STATIC_SRC
from .pins import NUITKA_PATCHES, SDISTS, STATIC_STAGE_VERSION
from .sources import apply_patch, extract, fetch_sdist
from .stagecache import BuildLog, cached_stage, stage_key


def _build_nuitka(tmp: Path, final: Path, log: BuildLog, python_stage: Path) -> None:
    """Nuitka's pure-Python package with our patches, in a stage of its own (put on the static interpreter's
    sys.path with PYTHONPATH) so that changing a Nuitka patch does not rebuild CPython."""
    import shutil

    work = tmp / "work"
    nsrc = extract(fetch_sdist("nuitka", log), work, log)
    for patch in NUITKA_PATCHES:
        apply_patch(STATIC_SRC / patch, nsrc, log)
    shutil.copytree(nsrc / "nuitka", tmp / "nuitka")
    shutil.rmtree(work)
    log.run([python_stage / "bin" / "python3.11", "-m", "nuitka", "--version"], env={"PYTHONPATH": str(tmp)})


def static_nuitka(python_stage: Path, verbose: bool = False) -> Path:
    key = stage_key("nuitka", STATIC_STAGE_VERSION, python_stage.name, SDISTS["nuitka"],
                     *[STATIC_SRC / f for f in NUITKA_PATCHES])
    return cached_stage("nuitka", key, lambda t, f, log: _build_nuitka(t, f, log, python_stage), verbose)

