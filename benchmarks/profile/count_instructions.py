"""Instructions one `cabs_merge` call executes on the compiled (numba) path,
per element per fine-tune, counted by single-stepping (stable under load,
unlike wall time).  See benchmarks/PROFILE.md for why not callgrind.

    cc -O2 -o /tmp/stepcount benchmarks/profile/stepcount.c
    python benchmarks/profile/count_instructions.py --stepcount /tmp/stepcount --rows 1 2 --k 3

For each --rows value the script runs itself under `stepcount` (one process
each), which counts the instructions of the main thread between two marks
(SIGUSR1) around one merge of a ROWS x 14336 bf16 tensor with K fine-tunes
(1 thread, density 0.25, bf16 output, as mergekit asks).  The difference
between two sizes removes what a call costs whatever its size.  Set
NUMBA_CPU_NAME and NUMBA_CPU_FEATURES (and a fresh NUMBA_CACHE_DIR) to count
the code numba generates for another CPU: ``NUMBA_CPU_NAME=znver1
NUMBA_CPU_FEATURES=`` is Zen 1's AVX2 code (run on this host; the count is a
property of the code, not of the CPU that runs it).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

COLS = 14336


def mark() -> None:
    """Start or stop counting (stepcount swallows the signal)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


def child(rows: int, k: int, counted: bool) -> None:
    import torch

    from mergekit_cabs.kernel import cabs_merge

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn((rows, COLS), generator=g) * 0.02).to(torch.bfloat16)
    models = [base + (torch.randn((rows, COLS), generator=g) * 1e-3).to(torch.bfloat16) for _ in range(k)]
    args = ([1.0] * k, [64] * k, 256)
    cabs_merge(base[:1], [m[:1] for m in models], *args, out_dtype=torch.bfloat16, backend="numba")  # compiles
    if counted:
        mark()
    cabs_merge(base, models, *args, out_dtype=torch.bfloat16, backend="numba")
    if counted:
        mark()


def count(stepcount: str, rows: int, k: int) -> int:
    cmd = [stepcount, sys.executable, __file__, "--child", str(rows), str(k)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(next(line for line in done.stderr.splitlines() if line.startswith("STEPS")).split()[2])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(int(sys.argv[2]), int(sys.argv[3]), counted=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stepcount", required=True, help="the compiled benchmarks/profile/stepcount.c")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2], help="tensor rows (of 14336) to count")
    ap.add_argument("--k", type=int, default=3, help="fine-tunes")
    args = ap.parse_args()
    child(1, args.k, counted=False)  # compile (and cache) outside the counted runs
    cpu = os.environ.get("NUMBA_CPU_NAME", "host")
    counts = {rows: count(args.stepcount, rows, args.k) for rows in args.rows}
    for rows, n in counts.items():
        print(f"{cpu}: {rows} x {COLS}, K = {args.k}: {n} instructions, {n / (rows * COLS * args.k):.2f} per element "
              "per fine-tune (with the per-call cost)")
    if len(counts) > 1:
        (r0, n0), (r1, n1) = sorted(counts.items())[0], sorted(counts.items())[-1]
        print(f"{cpu}: {(n1 - n0) / ((r1 - r0) * COLS * args.k):.2f} instructions per element per fine-tune "
              f"(difference of {r1} and {r0} rows); {n0 - (n1 - n0) * r0 / (r1 - r0):.0f} per call")


if __name__ == "__main__":
    main()
