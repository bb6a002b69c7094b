"""One tensor through mergekit's `merge_tensors`: cabs against task_arithmetic,
ties and dare_ties, for K = 2, 3, 5, 8 fine-tunes; then cabs over tensor sizes,
and the peak memory a merge adds, per K.

    python benchmarks/kernel.py                     # 4096 x 14336 bf16, K = 2 3 5 8
    python benchmarks/kernel.py --ks 3 --methods task_arithmetic cabs
    python benchmarks/kernel.py --device cuda       # on a GPU (cabs runs its torch path)

Inputs: a bf16 base ~ N(0, 0.02) and fine-tunes = base + N(0, 1e-3), density
0.25 (cabs: n = 64 of block_size 256), weight 1.0.  `cabs` is the default
path (numba on CPU when installed), `cabs[torch]` the pure torch path
(MERGEKIT_CABS_BACKEND=torch).  Each time is the median of --repeats calls
after a call on a small slice that loads the code (a method slower than
5 s is timed once).  Memory is
measured in a fresh process per case: the peak RSS during the merge (sampled
every millisecond) minus the RSS with the inputs loaded, in units of one
float32 copy of the tensor; the merged bf16 result itself is 0.5 of them.
On CUDA (`--device cuda`: the inputs are drawn on the GPU) that part is
skipped and the device's own peak is kept instead, per method and K:
`torch.cuda.max_memory_allocated()` over the timed calls, less what the
inputs hold, in bf16 copies of the tensor (the result itself is 1).
The overlap warning that K = 5 and 8 at density 0.25 give (5 * 64 > 256) is
silenced here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("task_arithmetic", "ties", "dare_ties", "cabs", "cabs[torch]")


def inputs(shape, k, device, seed=0):
    """The base and k fine-tunes, drawn on `device` (a GPU draws its own
    numbers: other values than the CPU's, the same distribution)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
    models = []
    for _ in range(k):
        models.append(base + (torch.randn(shape, generator=g, device=device) * 1e-3).to(torch.bfloat16))
    return [base, *models]


def merge_once(method: str, tensors, device) -> float:
    import torch
    from mergekit.merge_methods import merge_tensors

    import mergekit_cabs  # noqa: F401  registers cabs

    name, _, backend = method.partition("[")
    os.environ["MERGEKIT_CABS_BACKEND"] = backend.rstrip("]") or "auto"
    params = {"weight": 1.0} if name == "task_arithmetic" else {"weight": 1.0, "density": 0.25}
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    merge_tensors(tensors, name, parameters=params, base_index=0)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(method, tensors, device, repeats) -> float:
    merge_once(method, [t[:1, :256].clone() for t in tensors], device)  # loads code (numba)
    times = [merge_once(method, tensors, device)]
    if times[0] < 5:
        times += [merge_once(method, tensors, device) for _ in range(repeats - 1)]
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(method: str, shape, k: int) -> None:
    import threading

    tensors = inputs(shape, k, "cpu")
    merge_once(method, [t[:1, :256].clone() for t in tensors], "cpu")  # load code first
    before = rss_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:  # the creation of the inputs set ru_maxrss already: sample RSS
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = merge_once_keep(method, tensors)
    peak[0] = max(peak[0], rss_bytes())
    done.set()
    sampler.join()
    del result
    print(json.dumps({"extra_bytes": peak[0] - before}))


def merge_once_keep(method: str, tensors):
    """merge_tensors' result (kept, so its memory counts)."""
    from mergekit.merge_methods import merge_tensors

    name, _, backend = method.partition("[")
    os.environ["MERGEKIT_CABS_BACKEND"] = backend.rstrip("]") or "auto"
    params = {"weight": 1.0} if name == "task_arithmetic" else {"weight": 1.0, "density": 0.25}
    return merge_tensors(tensors, name, parameters=params, base_index=0)


def device_peak(method, tensors, args, device_memory: dict, k: int) -> float | None:
    """`timed`, and on CUDA the peak of `torch.cuda.max_memory_allocated` over
    its calls, kept in device_memory[k][method]: the peak and the peak less
    what was allocated before (the inputs), in bytes.  A method that runs out
    of device memory is kept as {"error": ...} and timed None; the next runs."""
    import torch

    if not args.device.startswith("cuda"):
        return timed(method, tensors, args.device, args.repeats)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = timed(method, tensors, args.device, args.repeats)
    except torch.OutOfMemoryError as error:
        device_memory.setdefault(k, {})[method] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        torch.cuda.empty_cache()
        return None
    peak = torch.cuda.max_memory_allocated()
    device_memory.setdefault(k, {})[method] = {"peak_bytes": peak, "extra_bytes": peak - held}
    return seconds


def time_ks(args, shape, device_memory: dict) -> dict:
    """Each method's median time for each number of fine-tunes, printed as a table."""
    times = {}
    print(f"\n{'K':>3s} " + " ".join(f"{m:>16s}" for m in args.methods) + "   cabs/TA  ties/cabs")
    for k in args.ks:
        tensors = inputs(shape, k, args.device)
        row = {m: device_peak(m, tensors, args, device_memory, k) for m in args.methods}
        times[k] = row
        ratios = ""
        if row.get("cabs") and row.get("task_arithmetic"):
            ratios += f"{row['cabs'] / row['task_arithmetic']:9.2f}"
        if row.get("cabs") and row.get("ties"):
            ratios += f"{row['ties'] / row['cabs']:10.1f}"
        cells = [f"{row[m]:15.3f}s" if row[m] is not None else f"{'out of memory':>16s}" for m in args.methods]
        print(f"{k:3d} " + " ".join(cells) + "  " + ratios, flush=True)
        del tensors
    return times


def time_sizes(args, shape) -> dict:
    """cabs with K = 3 on a quarter, half and all of the rows."""
    sizes = {}
    print("\ncabs, K = 3, over tensor size:")
    for rows in (shape[0] // 4, shape[0] // 2, shape[0]):
        tensors = inputs((rows, shape[1]), 3, args.device)
        t = timed("cabs", tensors, args.device, args.repeats)
        per = t / (rows * shape[1] * 3) * 1e9
        sizes[rows] = t
        print(f"  {rows}x{shape[1]}: {t:.3f} s  ({per:.2f} ns per element per fine-tune)")
    return sizes


def measure_memory(args, shape) -> dict:
    """Peak memory a merge adds, each case in a child process of its own."""
    memory: dict = {}
    print("\npeak memory a merge adds, in float32 copies of the tensor (result: 0.5):")
    numel4 = shape[0] * shape[1] * 4
    for method in [m for m in args.methods if m in ("task_arithmetic", "cabs", "cabs[torch]")]:
        cells = []
        for k in args.ks:
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", method, str(shape[0]), str(shape[1]), str(k)],
                capture_output=True, text=True, check=True,
            )
            extra = json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]
            memory.setdefault(method, {})[k] = extra
            cells.append(f"K={k}: {extra / numel4:4.2f}")
        print(f"  {method:16s} " + "  ".join(cells))
    return memory


def print_device_memory(device_memory: dict, shape) -> None:
    """The CUDA peaks `device_peak` kept, in bf16 copies of the tensor."""
    if not device_memory:
        return
    copy = shape[0] * shape[1] * 2
    print("\npeak device memory (torch.cuda.max_memory_allocated) during the calls, "
          "over the inputs, in bf16 copies of the tensor:")
    for k, row in device_memory.items():
        cells = "  ".join(f"{m}: {v['extra_bytes'] / copy:5.2f} ({v['peak_bytes'] / 2**30:.2f} GiB peak)"
                          if "error" not in v else f"{m}: {v['error']}" for m, v in row.items())
        print(f"  K={k}: {cells}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        method, rows, cols, k = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        return memory_child(method, (rows, cols), k)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 14336], help="rows and columns of the tensor")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 5, 8], help="numbers of fine-tunes")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory part")
    ap.add_argument("--no-sizes", action="store_true", help="skip the tensor-size part")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    import logging

    import torch

    logging.getLogger("mergekit_cabs").setLevel(logging.ERROR)  # the K * n > m notice
    shape = tuple(args.shape)
    print(f"tensor {shape[0]}x{shape[1]} bf16 on {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    report = {"shape": shape, "device": args.device, "sizes": {}, "memory": {}, "device_memory": {}}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    report["times"] = time_ks(args, shape, report["device_memory"])
    print_device_memory(report["device_memory"], shape)
    if not args.no_sizes and "cabs" in args.methods:
        report["sizes"] = time_sizes(args, shape)
    if not args.no_memory and args.device == "cpu":
        report["memory"] = measure_memory(args, shape)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
