"""A numba that cannot keep its on-disk cache still merges, and says so once.

numba compiles `_numba.py` with ``cache=True``. Where it finds no writable
directory for the cache it raises ``RuntimeError: cannot cache function ...``
at decoration, that is at ``import mergekit_cabs._numba``; reading or writing
the cache can also fail later, at the first call (a full disk, say). Either
way the compiled path must still work, without the cache, and say one line.

Each case runs in a fresh interpreter (the failure happens at import), which
compiles the kernel from scratch: a few seconds each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tiny_models import optional

REPO_ROOT = Path(__file__).resolve().parent.parent

# Merges on both backends, in float32 and bfloat16 (read as bits, rounded in
# the compiled code), with short last blocks and ties; prints "same" when
# every result has the same bits.
_MERGE = """
import torch
import mergekit_cabs._numba as compiled
from mergekit_cabs.kernel import cabs_masks, cabs_merge

assert compiled.available()
g = torch.Generator().manual_seed(0)
base = torch.randn(1000, generator=g) * 0.02
models = [base + torch.randint(-3, 4, (1000,), generator=g) * 2.0**-9 for _ in range(3)]
for dtype, out_dtype in [(torch.float32, None), (torch.bfloat16, torch.bfloat16)]:
    b, ms = base.to(dtype), [m.to(dtype) for m in models]
    args = (b, ms, [1.0, 0.5, -0.75], [4, 3, 5], 16)
    fast = cabs_merge(*args, lam=0.8, out_dtype=out_dtype, backend="numba")
    slow = cabs_merge(*args, lam=0.8, out_dtype=out_dtype, backend="torch")
    assert fast.dtype == slow.dtype, (fast.dtype, slow.dtype)
    bits = torch.int16 if fast.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(fast.view(bits), slow.view(bits)), dtype
    fast_masks = cabs_masks(b, ms, [4, 3, 5], 16, backend="numba")
    slow_masks = cabs_masks(b, ms, [4, 3, 5], 16, backend="torch")
    assert all(torch.equal(f, s) for f, s in zip(fast_masks, slow_masks))
print("same")
"""

# No place for a cache at all: numba finds no cache locator.
_NO_LOCATOR = """
import numba.core.caching
numba.core.caching.CacheImpl._locator_classes = []
"""

# A cache directory that takes no writes once the compile is done (a full disk).
_DISK_FULL = """
import errno
import numba.core.caching

def save(self, key, data):
    raise OSError(errno.ENOSPC, "No space left on device")

numba.core.caching.IndexDataCacheFile.save = save
"""


def _run(setup: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MERGEKIT_CABS_"))}
    env.update(NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(setup) + textwrap.dedent(_MERGE)],
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


# What the first process to compile the kernel says, once (`_numba.COMPILING`).
COMPILING = "mergekit-cabs: compiling the CPU kernel once (a few seconds; numba caches it for later runs)"


def _said_once(proc: subprocess.CompletedProcess, reason: str, before: tuple[str, ...] = ()) -> None:
    """The merges agree, and stderr is the lines `before`, then the no-cache line naming `reason`."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "same"
    lines = proc.stderr.splitlines()
    assert len(lines) == len(before) + 1 and tuple(lines[:-1]) == before, proc.stderr
    assert lines[-1].startswith("mergekit-cabs: numba cannot cache compiled code here ("), lines
    assert reason in lines[-1] and "compiling without a cache" in lines[-1], lines


def test_no_cache_locator_compiles_without_cache(tmp_path):
    """One line: the no-cache line, which says it compiles (no compiling line besides)."""
    optional("numba", "numba")
    proc = _run(_NO_LOCATOR, tmp_path / "cache")
    _said_once(proc, "no locator available")


def test_cache_write_failure_at_first_call(tmp_path):
    """The cache is empty, so the compile is said; saving it then fails, and that is said once."""
    optional("numba", "numba")
    cache_dir = tmp_path / "cache"
    proc = _run(_DISK_FULL, cache_dir)
    _said_once(proc, "No space left on device", before=(COMPILING,))
    assert not list(cache_dir.rglob("*.nbc")), "no cache entry could have been written"


def test_first_process_says_it_compiles_once_and_the_cached_next_one_says_nothing(tmp_path):
    """The usual case: a fresh cache, so the first process compiles the kernel
    and says so in one line (the merge would otherwise sit still for seconds);
    the next process reads it back from the cache, silently."""
    optional("numba", "numba")
    cache_dir = tmp_path / "cache"
    first = _run("", cache_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (first.stdout.strip(), first.stderr) == ("same", COMPILING + "\n")
    assert list(cache_dir.rglob("*.nbi")) and list(cache_dir.rglob("*.nbc"))
    second = _run("", cache_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (second.stdout.strip(), second.stderr) == ("same", "")


def test_damaged_cache_is_rebuilt_and_said_once(tmp_path):
    """Cache indexes cut short or overwritten with junk: compile again, say so
    once naming where the cache is, and replace it, so the next process is
    silent again."""
    optional("numba", "numba")
    cache_dir = tmp_path / "cache"
    assert _run("", cache_dir).stderr == COMPILING + "\n"
    indexes = sorted(cache_dir.rglob("*.nbi"))
    assert len(indexes) >= 2
    for i, index in enumerate(indexes):
        index.write_bytes(b"" if i % 2 else b"\xeb" * 64)
    proc = _run("", cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "same"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mergekit-cabs: numba's cache of compiled code in {cache_dir}"), lines
    assert lines[0].endswith("compiling again and replacing it"), lines
    again = _run("", cache_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (again.stdout.strip(), again.stderr) == ("same", "")
