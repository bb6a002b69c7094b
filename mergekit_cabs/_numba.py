"""The compiled CPU path for `kernel.py`, with numba: the same rule, equal bit for bit.

numba comes with ``pip install mergekit-cabs`` wherever numba ships wheels
(the markers in pyproject.toml); elsewhere ``pip install numba`` adds it, and
without it the pure torch path in `kernel.py` does the work.  `kernel.py` uses
this for CPU tensors when numba imports, unless ``MERGEKIT_CABS_BACKEND=torch``;
the tests compare both paths on every case.

Inputs are read as numpy arrays without a full-size copy (`_Input`): a tensor
already in the compute dtype is read in place, and so is a bfloat16 one when
the compute dtype is float32, as its int16 bit patterns, which `_load` widens
to float32 inside the compiled code (bfloat16 is the top half of float32, so
this is exact).  float16, and float32 or bfloat16 under a float64 compute
dtype, are converted by numpy one chunk at a time, also exactly; any other
dtype is converted once, up front, by torch.  The sum is kept in the compute
dtype, right in the result when that is the output dtype.  A bfloat16 output
of a float32 merge is rounded inside `_finish` as torch's CPU conversion
rounds (to nearest, ties to even); any other output dtype is rounded by
numpy, which rounds as torch does.

Why the results are the same bits: each input conversion above gives what
torch's gives; tau is one subtraction, and per kept place the sum does
``acc = acc + tau * weight`` with the weight in the compute dtype, then
``acc * lam + base``: the same IEEE operations in the same order (numba
without fastmath does not fuse a multiply and an add).  Places that are not
kept add nothing, which equals the torch path's ``acc + 0 * weight``, since
the accumulator is never -0.0.  The kept set is defined by ranks, not by how
it is found: free before claimed, larger |tau| before smaller, lower index
first.

How a block's kept set is found: its threshold T is the q-th largest key
(`_model_pass` says what a key is).  Neighbouring blocks are much alike, so
the previous block's T is a good guess: one vectorized pass counts the keys
>= and > the guess (`_guess_counts`), and where T is not the guess itself, a
pass per distinct key value walks down or up to it (`_walk_down`,
`_walk_up`); a chunk's first block, and a block whose T is more than _WALK
values away, take a radix select (`_threshold`).  Each way gives the same T
and count of keys >= T; `_take` keeps the keys above T and the first of
those equal to it.  Every loop over a block is branch-free and as wide as
the keys, so it vectorizes for AVX2 as for AVX-512 (benchmarks/PROFILE.md
has the instruction counts).

Work is split into chunks of whole blocks (about 64K elements each) handed to
threads (numba releases the GIL), as many as ``torch.get_num_threads()``;
blocks are independent, so the result does not depend on the split.

The compiled code is cached on disk (where ``NUMBA_CACHE_DIR`` says, else in
the ``__pycache__`` next to this file, else in a per-user cache directory),
so only the first process after an install compiles it (about 4 s; it says
so in one line on stderr, `COMPILING`, when the cache cannot serve it).  Where
numba can keep no cache (no writable place for one), or reading or writing
the cache fails, `_jit` compiles without it and says so once: merges work,
and each process compiles again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
except ImportError:  # the torch path does the work
    numba = None

# Elements per task handed to a thread (rounded to whole blocks).
_TASK_ELEMENTS = 1 << 16


def available() -> bool:
    return numba is not None


_SMALL = 32  # sets this small are sorted outright
_WALK = 16  # distinct key values looked through from a guess before the radix select
_MAX_GUESSED = 1 << 31  # longer blocks: no guess (its counts are 32 bits wide)


def _threshold(keys, length, q, hist, pool):
    """(T, ge) for keys[:length] and 1 <= q < length: T is the q-th largest
    key, ge the number of keys >= T.

    A radix select from the top: skip the bits all remaining keys share, count
    the next 8 bits in `hist`, keep only the bucket that holds the q-th
    largest (copied into `pool`), and repeat until few keys are left, which
    are sorted.  The answer does not depend on the path taken.
    """
    low8 = np.uint64(255)
    src = keys
    n = length
    above = 0  # keys known to be larger than every key left in src[:n]
    while True:
        if n <= _SMALL:
            for j in range(n):
                pool[j] = src[j]
            for j in range(1, n):  # insertion sort, descending
                value = pool[j]
                i = j - 1
                while i >= 0 and pool[i] < value:
                    pool[i + 1] = pool[i]
                    i -= 1
                pool[i + 1] = value
            threshold = pool[q - above - 1]
            ge = q - above
            while ge < n and pool[ge] == threshold:
                ge += 1
            return threshold, above + ge
        all_and = src[0] | np.uint64(0)
        all_or = all_and
        largest = all_and
        for j in range(n):
            all_and &= src[j]
            all_or |= src[j]
            largest = max(largest, src[j])
        differ = all_and ^ all_or
        if differ == 0:
            pool[0] = all_and  # in the keys' dtype, as the other return
            return pool[0], above + n
        top = 0
        rest = differ >> 1
        while rest != 0:
            rest >>= 1
            top += 1
        shift = max(top - 7, 0)
        hist[:] = 0
        for j in range(n):
            hist[(src[j] >> shift) & low8] += 1
        digit = np.int64((largest >> shift) & low8)  # no key has a higher digit
        while above + hist[digit] < q:
            above += hist[digit]
            digit -= 1
        kept = 0
        for j in range(n):
            value = src[j]
            pool[kept] = value
            kept += np.int64((value >> shift) & low8) == digit
        src = pool
        n = kept


def _load(src, start, stop, bf16, out, out_bits):
    """out[:stop - start] = src[start:stop] in the compute dtype; `bf16`: src
    holds bfloat16 bit patterns (int16), which are the top half of float32's."""
    block = src[start:stop]  # a slice: indexing src[start + j] would check for a negative index every time
    if bf16:
        for j in range(stop - start):
            out_bits[j] = np.uint32(np.uint16(block[j])) << np.uint32(16)
    else:
        for j in range(stop - start):
            out[j] = block[j]


def _walk_down(keys, length, q, value, count, zero):
    """(T, ge) as `_threshold` gives them, looking down from a guess: `count`
    (< q) keys are above `value`, the largest key below the guess.  One pass
    per distinct key value walked (it counts the keys equal to `value` and
    finds the largest below it: both vectorize); (zero, -1) when the
    threshold is more than _WALK values away.  `zero` is 0 in the keys'
    dtype (numba widens arithmetic on it to 64 bits, and the loop with it)."""
    for _ in range(_WALK):
        below, equal = zero, 0
        for j in range(length):
            key = keys[j]
            equal += key == value
            below = max(below, key if key < value else zero)
        count += np.int32(equal)  # counted 32 bits wide (see `_guess_counts`)
        if count >= q:
            return value, count
        value = below
    return zero, -1


def _walk_up(keys, length, q, value, count, zero, ones):
    """Like `_walk_down`, looking up: `count` (>= q) keys are >= `value`, the
    smallest key above the guess; `ones` is the largest key value."""
    for _ in range(_WALK):
        above = ones
        equal = 0
        for j in range(length):
            key = keys[j]
            equal += key == value
            above = min(above, key if key > value else ones)
        equal = np.int32(equal)
        if count - equal < q:
            return value, count
        count -= equal
        value = above
    return zero, -1


def _take(keys, length, q, threshold, at_least, takes):
    """takes[:length] = the q top-ranked keys of keys[:length], given the
    threshold T (the q-th largest key) and the number of keys >= T: ties at
    the threshold go to the lowest indices."""
    for j in range(length):
        takes[j] = keys[j] >= threshold
    # Not every key equal to the threshold may fit: the lowest indices
    # go in, so the last (at_least - q) of them stay out.
    drop = at_least - q
    j = length - 1
    while drop > 0:
        if keys[j] == threshold:
            takes[j] = False
            drop -= 1
        j -= 1


def _make_keys(tau_bits, claimed, length, keys, free_bit, zero):
    """keys[:length] from tau's bits and `claimed` (see `_model_pass`);
    returns the largest |tau| (as bits).  `zero` is 0 in the keys' dtype:
    numba widens integer arithmetic to 64 bits, but a value stored to and
    read from `keys` is narrow again, so the loops stay as wide as the keys
    (8 per AVX2 step for float32)."""
    magnitude = free_bit - np.uint64(1)
    for j in range(length):
        keys[j] = tau_bits[j] & magnitude
    largest = zero
    for j in range(length):
        key = keys[j]
        largest = max(largest, key)
        keys[j] = key if claimed[j] else key | free_bit
    return largest


def _guess_counts(keys, length, guess, zero, ones):
    """How keys[:length] lie around a guess of the threshold: the numbers of
    keys >= and > `guess`, the largest key below it and the smallest above it
    (`zero` and `ones` where there is none).  The counts are cut to 32 bits
    as they leave the loop, so the compiler counts 32 bits wide (8 keys per
    AVX2 step); the caller guesses only for blocks shorter than 2**31."""
    at_least, over, below, above = 0, 0, zero, ones
    for j in range(length):
        key = keys[j]
        at_least += key >= guess
        over += key > guess
        below = max(below, key if key < guess else zero)
        above = min(above, key if key > guess else ones)
    return np.int32(at_least), np.int32(over), below, above


def _find(keys, length, q, guess, hist, pool, limits):
    """(T, ge) for 1 <= q < length, as `_threshold` gives them: near the
    guess (the previous block's T) when there is one and the threshold is
    near it, else by the radix select.  `guess` is None for a chunk's first
    block; `limits` holds 0 and the largest key, in the keys' dtype."""
    if guess is not None and length < _MAX_GUESSED:
        at_least, over, below, above = _guess_counts(keys, length, guess, limits[0], limits[1])
        if over < q <= at_least:
            return guess, at_least
        if at_least < q:
            threshold, ge = _walk_down(keys, length, q, below, at_least, limits[0])
        else:
            threshold, ge = _walk_up(keys, length, q, above, over, limits[0], limits[1])
        if ge >= 0:
            return threshold, ge
    return _threshold(keys, length, q, hist, pool)


def _model_pass(model, model_bf16, base, base_bf16, acc, claimed, mv, mv_bits, bv, bv_bits,
                tau, tau_bits, keys, takes, hist, pool, mask,
                block_size, quota, tail_quota, weight, free_bit, infinity, strict, aware, want_mask):
    """One model over one chunk of whole blocks (the last may be short).

    `model` and `base` are the chunk's inputs, in the compute dtype or as
    bfloat16 bits (see `_load`; `mv` and `bv` take one block of each).  Adds
    weight * (kept tau) into `acc`, updates `claimed`, and writes the
    keep-mask into `mask` when `want_mask`.  A place's key is |tau|'s bit
    pattern (non-negative floats order like their bits) with the top bit set
    when the place is free.  Each block's threshold is looked for first near
    the previous block's (`_find`).  Returns False as soon as a block holds a
    tau that is not finite (the caller finds out which input is at fault).
    The loops are simple and branch-free on purpose, so that the compiler
    vectorizes them, with AVX2 as with AVX-512.
    """
    no_weight = weight - weight
    limits = np.zeros(2, keys.dtype)  # 0 and the largest key, in the keys' dtype
    limits[1] = free_bit | (free_bit - np.uint64(1))
    guess = limits[0]
    have_guess = False
    numel = model.size
    for start in range(0, numel, block_size):
        length = min(block_size, numel - start)
        stop = start + length
        q = quota if length == block_size else tail_quota
        _load(model, start, stop, model_bf16, mv, mv_bits)
        _load(base, start, stop, base_bf16, bv, bv_bits)
        a_block, c_block = acc[start:stop], claimed[start:stop]
        for j in range(length):
            tau[j] = mv[j] - bv[j]
        largest = _make_keys(tau_bits, c_block, length, keys, free_bit, limits[0])
        if largest >= infinity:
            return False
        if q <= 0:
            continue
        if q >= length:
            takes[:length] = True
        else:
            guess, at_least = _find(keys, length, q, guess if have_guess else None, hist, pool, limits)
            have_guess = True
            _take(keys, length, q, guess, at_least, takes)
        _add_kept(a_block, c_block, tau, takes, length, weight, no_weight, strict, aware)
        if want_mask:
            mask[start:stop] = takes[:length]
    return True


def _add_kept(a_block, c_block, tau, takes, length, weight, no_weight, strict, aware):
    """acc += weight * (kept tau) and the claims, on one block's slices of
    them; `takes` loses the claimed places first when `strict`.  Bitwise,
    not short-circuit, operators: they vectorize."""
    if strict:
        for j in range(length):
            takes[j] = takes[j] & (not c_block[j])
    for j in range(length):
        a_block[j] = a_block[j] + (tau[j] * weight if takes[j] else no_weight)
    if aware:
        for j in range(length):
            c_block[j] = c_block[j] | (takes[j] & (tau[j] != 0))


def _finish(acc, acc_bits, base, base_bf16, bv, bv_bits, lam, out_bf16, to_bf16):
    """acc = acc * lam + base, a block (the length of `bv`) at a time; with
    `to_bf16`, also rounded to bfloat16 bits in `out_bf16` as torch's CPU
    conversion rounds: to nearest, ties to even, NaN to 0xFFFF (only a sum
    that overflows both ways gives NaN; the tests compare with torch)."""
    numel, step = acc.size, bv.size
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        _load(base, start, stop, base_bf16, bv, bv_bits)
        block = acc[start:stop]
        for j in range(stop - start):
            block[j] = block[j] * lam + bv[j]
        if to_bf16:
            bits, out = acc_bits[start:stop], out_bf16[start:stop]
            for j in range(stop - start):
                u = np.uint32(bits[j])
                if u & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
                    out[j] = np.int16(-1)  # 0xFFFF, torch's bfloat16 NaN on CPU
                else:
                    u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
                    out[j] = np.int16(np.uint16(u))


_cache_said = False  # the no-cache line is said once per process
_repair_said = False  # and so is the damaged-cache line
_compile_said = False  # and the line that the kernel is being compiled
COMPILING = "mergekit-cabs: compiling the CPU kernel once (a few seconds; numba caches it for later runs)"


def _say(line: str) -> None:
    """One line on stderr, clear of any tqdm progress bar there (mergekit's)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _no_cache(reason: BaseException) -> None:
    global _cache_said
    if not _cache_said:
        _cache_said = True
        _say(f"mergekit-cabs: numba cannot cache compiled code here ({reason}); compiling without a "
             "cache, so every process compiles again (~4 s)")


def _compiling() -> None:
    """Say once per process that the kernel is being compiled, when numba's
    cache could not serve it (the merge then pauses for a few seconds); not
    again after the no-cache or damaged-cache line, which say it already."""
    global _compile_said
    if not (_compile_said or _cache_said or _repair_said):
        _compile_said = True
        _say(COMPILING)


class _GuardedCache:
    """A dispatcher's on-disk cache, whose errors cost the cache, not the merge.

    numba checks at decoration that it has a writable cache directory (see
    `_jit`), but reading and writing happen at the first call, where a full
    disk, a directory gone read-only or a damaged index file would raise out
    of the merge.  Here such an error is said once and the cache switched off
    for that function; it then compiles, or keeps what it compiled."""

    def __init__(self, cache):
        self._cache = cache

    def _off(self, reason: BaseException) -> None:
        from numba.core.caching import NullCache

        self._cache = NullCache()
        _no_cache(reason)

    def load_overload(self, sig, target_context):
        """What the cache holds for `sig`, or None: numba then compiles it (said once)."""
        try:
            found = self._cache.load_overload(sig, target_context)
        except Exception as err:  # unreadable or damaged: compile instead
            self._repair(err)
            return None
        if found is None:
            _compiling()
        return found

    def _repair(self, reason: BaseException) -> None:
        """Empty a damaged cache index, so that what is compiled now replaces
        it; where even that fails, go on without the cache."""
        global _repair_said
        try:
            self._cache.flush()
        except Exception:  # noqa: BLE001 (not writable either)
            self._off(reason)
            return
        if not _repair_said:
            _repair_said = True
            _say(f"mergekit-cabs: numba's cache of compiled code in {self._cache.cache_path} could not be read "
                 f"({reason}); compiling again and replacing it")

    def save_overload(self, sig, data):
        try:
            self._cache.save_overload(sig, data)
        except Exception as err:
            self._off(err)

    def __getattr__(self, name):  # flush(), cache_path and the like
        return getattr(self._cache, name)


def _jit(func):
    """``numba.njit(nogil=True, cache=True)(func)``, or without the cache where
    numba cannot keep one.  Without a writable cache directory numba raises
    ``RuntimeError: cannot cache function ...: no locator available`` right
    here, at decoration (not an ImportError, and not at the first call)."""
    if not _cache_said:
        try:
            dispatcher = numba.njit(nogil=True, cache=True)(func)
        except RuntimeError as err:
            if "cannot cache" not in str(err):
                raise
            _no_cache(err)
        else:
            if hasattr(dispatcher, "_cache"):  # numba's own attribute; guard if present
                dispatcher._cache = _GuardedCache(dispatcher._cache)
            return dispatcher
    return numba.njit(nogil=True)(func)


if numba is not None:
    _threshold = _jit(_threshold)
    _load = _jit(_load)
    _walk_down = _jit(_walk_down)
    _walk_up = _jit(_walk_up)
    _take = _jit(_take)
    _make_keys = _jit(_make_keys)
    _guess_counts = _jit(_guess_counts)
    _find = _jit(_find)
    _add_kept = _jit(_add_kept)
    _model_pass = _jit(_model_pass)
    _finish = _jit(_finish)


def run(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    quotas: Sequence[int],
    tail_quotas: Sequence[int],
    block_size: int,
    strict: bool,
    aware: bool,
    dtype: torch.dtype,
    *,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """For flat CPU tensors: the merge when `weights` is given, computed in
    `dtype` and rounded once to `out_dtype` (default `dtype`), and/or the
    keep-masks, written into the flat bool tensors `masks`.  Returns the
    merged flat tensor (an empty one when only masks were asked for), or None
    when some tau is not finite."""
    job = _Job(base, models, quotas, tail_quotas, block_size, strict, aware, dtype,
               weights=weights, lam=lam, out_dtype=out_dtype or dtype, masks=masks)
    starts = range(0, base.numel(), job.span)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        ok = all(job.task(start) for start in starts)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="cabs") as pool:
            ok = all(list(pool.map(job.task, starts)))
    return job.result if ok else None


class _Job:
    """One call of `run`: its inputs as numpy, its settings, and the work on
    one chunk of whole blocks (`task`), which threads run side by side."""

    def __init__(self, base, models, quotas, tail_quotas, block_size, strict, aware, dtype, *,
                 weights, lam, out_dtype, masks):
        self.numel, self.block_size, self.strict, self.aware = base.numel(), block_size, strict, aware
        self.quotas, self.tail_quotas = quotas, tail_quotas
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.key_dtype = np.uint64 if dtype == torch.float64 else np.uint32
        self.free_bit = self.key_dtype(1 << (8 * np.dtype(self.key_dtype).itemsize - 1))
        self.infinity = np.array(np.inf, self.np_dtype).view(self.key_dtype)[()]  # bits of +inf
        self.weights = np.asarray(weights if weights is not None else [0.0] * len(models), dtype=self.np_dtype)
        self.lam = self.np_dtype(lam)
        self.want_mask = masks is not None
        self.masks = [m.numpy() for m in masks] if self.want_mask else [np.zeros(1, np.bool_)] * len(models)
        self.merging = weights is not None
        self.result = torch.empty(self.numel if self.merging else 0, dtype=out_dtype)
        self.in_place = self.merging and out_dtype == dtype  # accumulate right in the result
        self.to_bf16 = out_dtype == torch.bfloat16 and dtype == torch.float32
        self.result_np = self.result.view(torch.int16).numpy() if self.to_bf16 else self.result.numpy()
        self.no_bf16 = np.zeros(1, np.int16)
        self.base = _Input(base, dtype)
        self.models = [_Input(model, dtype) for model in models]
        self.span = max(block_size, _TASK_ELEMENTS // block_size * block_size)

    def task(self, start: int) -> bool:
        """Merge (and/or mask) elements [start, start + span); False on a non-finite tau.

        numpy and numba only in here: a torch op in these threads would start
        torch's own thread pool on top of them."""
        stop = min(start + self.span, self.numel)
        size, np_dtype, key_dtype = stop - start, self.np_dtype, self.key_dtype
        length = min(self.block_size, size)
        scratch = np.empty(size, np_dtype)
        base_chunk = self.base.chunk(start, stop, np.empty(size, np_dtype))
        acc = self.result_np[start:stop] if self.in_place else np.empty(size, np_dtype)
        acc[:] = 0
        claimed = np.zeros(size, np.bool_)
        mv, bv, tau = (np.empty(length, np_dtype) for _ in range(3))
        keys, takes, pool = np.empty(length, key_dtype), np.empty(length, np.bool_), np.empty(length, key_dtype)
        hist = np.empty(256, np.int32)
        for i, model in enumerate(self.models):
            mask = self.masks[i][start:stop] if self.want_mask else self.masks[i]
            if not _model_pass(
                model.chunk(start, stop, scratch), model.bf16, base_chunk, self.base.bf16,
                acc, claimed, mv, mv.view(key_dtype), bv, bv.view(key_dtype),
                tau, tau.view(key_dtype), keys, takes, hist, pool, mask,
                self.block_size, self.quotas[i], self.tail_quotas[i], self.weights[i], self.free_bit,
                self.infinity, self.strict, self.aware, self.want_mask,
            ):
                return False
        if self.merging:
            self._finish(start, stop, acc, base_chunk, bv)
        return True

    def _finish(self, start: int, stop: int, acc: np.ndarray, base_chunk: np.ndarray, bv: np.ndarray) -> None:
        out = self.result_np[start:stop]
        _finish(acc, acc.view(self.key_dtype), base_chunk, self.base.bf16, bv, bv.view(self.key_dtype), self.lam,
                out if self.to_bf16 else self.no_bf16, self.to_bf16)
        if not (self.in_place or self.to_bf16):  # float16 and the like: numpy rounds as torch does
            with np.errstate(over="ignore", invalid="ignore"):  # inf, as torch gives, unsaid
                np.copyto(out, acc, casting="unsafe")


class _Input:
    """One flat input tensor as numpy: read in place when it already is in the
    compute dtype, or is bfloat16 with a float32 compute dtype (as its bits);
    else converted a chunk at a time by numpy (float16, float32 -> float64:
    exact, as torch converts them)."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype):
        tensor = tensor.contiguous()
        self.bf16 = tensor.dtype == torch.bfloat16 and dtype == torch.float32
        if tensor.dtype == dtype or self.bf16:
            self.array = (tensor.view(torch.int16) if self.bf16 else tensor).numpy()
            self.direct = True
            return
        if tensor.dtype not in (torch.float16, torch.float32, torch.bfloat16):
            tensor = tensor.to(dtype)  # anything else: once, up front
        self.direct = tensor.dtype == dtype
        if tensor.dtype == torch.bfloat16:  # to float32 bits, then float64 below
            tensor = tensor.view(torch.int16)
        self.array = tensor.numpy()
        self.from_bf16 = tensor.dtype == torch.int16

    def chunk(self, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
        if self.direct:
            return self.array[start:stop]
        part = self.array[start:stop]
        if self.from_bf16:
            part = (part.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
        np.copyto(scratch, part, casting="unsafe")
        return scratch
