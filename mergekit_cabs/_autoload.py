"""Make mergekit see the ``cabs`` method without any code from the user.

How it works
------------
The wheel ships ``mergekit_cabs_autoload.pth`` next to the package. Python's
``site`` module runs its single ``import`` line at every interpreter start-up
in that environment; the line calls :func:`install_hook`, which puts a small
finder at the front of ``sys.meta_path``. ``import mergekit_cabs`` calls
:func:`install_hook` too, so ``python -S`` or an environment that skipped the
``.pth`` still works once the package is imported.

The finder does nothing for any module except ``mergekit.merge_methods``. For
that one it asks the finders behind it for the real spec (whatever they are:
``PathFinder``, an editable-install finder, a zip importer...), and wraps the
spec's loader so that the real module executes first and then
``mergekit_cabs.method.install()`` registers ``cabs``. The finder leaves
``sys.meta_path`` and puts the real loader back on the module as soon as it
has fired, so it costs nothing afterwards. If ``mergekit.merge_methods`` has
already been imported when the hook is installed, ``install()`` runs at once.

Switching it off: with ``MERGEKIT_CABS_AUTOLOAD=0`` in the environment the
hook does nothing, and nothing registers ``cabs`` until the program calls
``mergekit_cabs.install()`` itself (or imports ``mergekit_cabs.method``).

Start-up cost: this module imports only ``sys`` and ``os`` (both already
loaded by the interpreter), so a Python process that never touches mergekit imports nothing
else because of this package: no torch, no mergekit, no ``importlib.util``.

Errors: a broken plugin must not take mergekit down for the users of every
other merge method. If ``install()`` raises, one line naming mergekit-cabs and
the error goes to stderr, and mergekit imports normally without ``cabs``
(asking for ``cabs`` then fails with mergekit's own "Unimplemented merge
method" message). With the environment variable ``MERGEKIT_CABS_STRICT=1``
the error is raised instead, which makes the import of mergekit fail; the
test suite sets it so a broken registration cannot pass unnoticed.
"""

import os
import sys

TARGET = "mergekit.merge_methods"
STRICT_ENV = "MERGEKIT_CABS_STRICT"
SWITCH_ENV = "MERGEKIT_CABS_AUTOLOAD"


def _run_install():
    """Register cabs with mergekit, reporting failures as described above."""
    method = sys.modules.get("mergekit_cabs.method")
    if getattr(getattr(method, "__spec__", None), "_initializing", False):
        # `mergekit_cabs.method` is being imported (say by `from mergekit_cabs
        # import cabs_method`) and imported mergekit: it registers itself
        # when it is done.
        return True
    try:
        from mergekit_cabs.method import install

        install()
    except Exception as error:
        if os.environ.get(STRICT_ENV) == "1":
            raise
        sys.stderr.write(
            "mergekit-cabs: could not register the 'cabs' merge method "
            f"({type(error).__name__}: {error}); mergekit works without it. "
            f"Set {STRICT_ENV}=1 to raise instead.\n"
        )
        return False
    return True


class _WrappedLoader:
    """Run the real loader, then register cabs once the module is complete."""

    def __init__(self, finder, loader):
        self._finder = finder
        self._loader = loader

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module):
        # Give the module its real loader back before it runs, so that
        # ``__loader__``/``__spec__.loader`` (importlib.resources, reload, ...)
        # never see this wrapper.
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        # The module executed without error: the hook has done its job.
        self._finder._retire()
        _run_install()

    def __getattr__(self, name):
        # Anything else (is_package, get_code, get_resource_reader, ...)
        # is the real loader's business. (Looked up via __dict__ so that a
        # half-built instance, e.g. from copy.copy, cannot recurse.)
        loader = self.__dict__.get("_loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)


class CabsAutoloadFinder:
    """Meta-path finder that waits for ``mergekit.merge_methods``."""

    def __init__(self):
        self._busy = False
        self.fired = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or self.fired or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        if not hasattr(spec.loader, "exec_module"):
            # A legacy loader we cannot wrap safely: leave it alone. cabs is
            # then registered by ``import mergekit_cabs`` (install_hook() sees
            # the imported module and calls install() directly).
            return spec
        spec.loader = _WrappedLoader(self, spec.loader)
        return spec

    def _retire(self):
        self.fired = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    # Older code asks finders for this; nothing to invalidate.
    def invalidate_caches(self):
        pass


_finder = None


def install_hook():
    """Make sure ``cabs`` is registered when mergekit's methods are loaded.

    Idempotent and cheap. If ``mergekit.merge_methods`` is already fully
    imported, registers cabs right away; otherwise makes sure one finder is
    waiting at the front of ``sys.meta_path`` to do it after that module has
    executed.
    """
    global _finder
    if os.environ.get(SWITCH_ENV) == "0":
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        spec = getattr(module, "__spec__", None)
        if not getattr(spec, "_initializing", False):
            if _finder is not None:
                _finder._retire()
            _run_install()
            return
    if _finder is None or _finder.fired:
        # First call, or mergekit.merge_methods was dropped from sys.modules
        # after the hook fired (a re-import gets a fresh registry): re-arm.
        _finder = CabsAutoloadFinder()
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
