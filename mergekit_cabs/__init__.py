"""CABS (Conflict-Aware and Balanced Sparsification) merge method for mergekit.

Installing this package is enough for ``mergekit-yaml`` and friends to accept
``merge_method: cabs`` (a start-up hook registers it when mergekit's merge
methods are imported). Importing it is cheap: torch and mergekit are loaded
only when one of its public names is first used, or when mergekit itself is
imported. The public names: ``cabs_merge`` and ``cabs_masks`` (the kernel on
one tensor), ``cabs_method`` and ``install`` (the mergekit method and its
registration), ``CabsError`` (the one error type of the package's checks),
``__version__``; and the ``tune`` and ``analyze`` subpackages.
"""

from mergekit_cabs import _autoload

__version__ = "0.2.0"

__all__ = ["__version__", "CabsError", "cabs_merge", "cabs_masks", "cabs_method", "install"]

_LAZY = {
    "CabsError": "mergekit_cabs.params",
    "cabs_merge": "mergekit_cabs.kernel",
    "cabs_masks": "mergekit_cabs.kernel",
    "cabs_method": "mergekit_cabs.method",
    "install": "mergekit_cabs.method",
}


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


_autoload.install_hook()
