"""Which code path computes CABS: the ``MERGEKIT_CABS_BACKEND`` setting, read and checked here only.

``auto`` (the default: the compiled numba path for CPU tensors when numba is
installed, else pure torch), ``torch`` or ``numba``; upper case and spaces
around it are accepted, and an empty value is ``auto``.  `params` checks it
when a merge is planned (so a bad value stops the plan, not the merge),
`kernel` reads it for each call without a ``backend=``, and `method` reads it
to tell whether the user chose the torch path.  Nothing here imports torch or
mergekit (numba only to check ``numba``).
"""

from __future__ import annotations

import os

ENV = "MERGEKIT_CABS_BACKEND"
BACKENDS = ("auto", "torch", "numba")


def requested_backend() -> str:
    """MERGEKIT_CABS_BACKEND as given (lower case, 'auto' when unset or empty), unchecked."""
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def backend_setting() -> str:
    """MERGEKIT_CABS_BACKEND, checked: 'auto' (the default), 'torch' or 'numba'.
    ValueError (one line naming the variable) otherwise, or for 'numba' without numba."""
    backend = requested_backend()
    if backend not in BACKENDS:
        raise ValueError(f"{ENV} is {backend!r}; it must be one of {', '.join(BACKENDS)}, or unset")
    if backend == "numba":
        from mergekit_cabs import _numba

        if not _numba.available():
            raise ValueError(f'{ENV} is "numba", but numba is not installed: pip install numba, or unset it')
    return backend
