"""Writing results: the output directory, number formatting, plot set-up.

Shared by analyze and tune.  Files are written into a staging directory next
to the output and moved in at the end (`publish`), so a failure never leaves a
file that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mergekit_cabs.params import CabsError

PLOTS_HINT = 'pip install "mergekit-cabs[plot]" gets the plots (matplotlib)'


def check_out_dir(out: Path, force: bool, names: Sequence[str], error: type[CabsError] = CabsError) -> None:
    """Refuse a file, or a directory that holds files unless `force`."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise error(
            f"--out {out} already holds files; pass --force to replace its "
            f"{', '.join(names)} (other files are left alone), or give another --out"
        )


def publish(out: Path, names: Sequence[str], build: Callable[[Path], list[str]]) -> list[str]:
    """Let `build` write files into a temporary directory next to `out`, then
    move them in, in the order it returns them (so the last one, the JSON,
    appears last).  Earlier files of `names` in `out` are replaced or removed;
    a failure leaves no new file that looks complete.  Returns the names written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        written = build(staging)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def fmt(x: float | None, spec: str = ".4f") -> str:
    """`x` formatted, or '-' for a missing value."""
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    """A share as a percentage with two decimals, or '-'."""
    return "-" if x is None else f"{100 * x:.2f}%"


def short_names(labels: Sequence[str]) -> list[str]:
    """Last path component of each model, unless two would look the same."""
    short = [os.path.basename(label.rstrip("/\\")) or label for label in labels]
    return short if len(set(short)) == len(short) else list(labels)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
