"""Install tests: does a real ``pip install`` make mergekit see ``cabs``?

Each mode (``pip install .`` and ``pip install -e .``) gets a fresh virtual
environment built from a copy of the project (so no build output lands in the
repository). To stay fast and offline apart from the build backend, the new
environment does not download torch/mergekit again: it is created with
``--without-pip``, our package is installed into it with ``--no-deps`` by the
running interpreter's pip (``pip --python``), and a last-sorting ``.pth`` file
appends the running environment's site-packages as plain path entries. Plain
path entries are not scanned for ``.pth`` files, so only the new environment's
own start-up hooks run; its own ``site-packages`` comes first on ``sys.path``,
so our package is always imported from the installation under test (every
check asserts where it came from).

mergekit's console scripts live in the running environment, bound to its
interpreter, so the new environment gets the same two-line wrappers that pip
writes for them (``mergekit-yaml``, ``mergekit-multi``, ``mergekit-pytorch``).

The build uses pip's normal build isolation, like a user's ``pip install``,
so it needs the package index (or pip's cache) to fetch hatchling; so does
the sdist test, which installs hatchling into a venv of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.install

REPO_ROOT = Path(__file__).resolve().parent.parent
PTH_NAME = "mergekit_cabs_autoload.pth"
# What a build needs from the project tree (the sdist's own list).
BUILD_FILES = ["pyproject.toml", "hatch_build.py", PTH_NAME, "README.md", "LICENSE"]
# and what else the sdist carries (the docs, which tests/test_docs_*.py read)
SDIST_DIRS = ["tests", "example_configs", "docs"]
SDIST_FILES = ["mkdocs.yml", "CHANGELOG.md"]
# the one place the version is written
VERSION = re.search(
    r'^__version__ = "([^"]+)"$', (REPO_ROOT / "mergekit_cabs" / "__init__.py").read_text(), re.M
).group(1)
CLIS = {
    "mergekit-yaml": "mergekit.scripts.run_yaml",
    "mergekit-multi": "mergekit.scripts.multimerge",
    "mergekit-pytorch": "mergekit.scripts.merge_raw_pytorch",
}
HEAVY = ("torch", "mergekit", "transformers", "importlib.util", "importlib.abc")
BLOCK = 16
N_KEEP = 4


# --------------------------------------------------------------------------
# helpers


def _parent_site_dirs():
    dirs = []
    for d in [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if d not in dirs and os.path.isdir(d):
            dirs.append(d)
    return dirs


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(
        MERGEKIT_CABS_STRICT="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    env.update(extra)
    return env


def _run(cmd, env=None, cwd=None, check=True, timeout=300):
    proc = subprocess.run(
        [str(c) for c in cmd],
        env=env or _env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def _copy_project(dest: Path, dirs=("mergekit_cabs",)) -> Path:
    dest.mkdir(parents=True)
    for name in BUILD_FILES:
        src = REPO_ROOT / name
        assert src.is_file(), f"{name} is missing from the project root; the build needs it"
        shutil.copy2(src, dest / name)
    for name in dirs:
        shutil.copytree(
            REPO_ROOT / name,
            dest / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"),
        )
    return dest


def _metadata(text: str):
    """A METADATA / PKG-INFO file's headers (multi-valued ones via get_all)."""
    return HeaderParser().parsestr(text)


class Venv:
    def __init__(self, root: Path):
        self.root = root
        self.python = root / "bin" / "python"
        self.bin = root / "bin"
        out = _run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
        self.site = Path(out.stdout.strip())

    @classmethod
    def create(cls, root: Path, borrow_parent: bool = True) -> Venv:
        _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
        venv = cls(root)
        if borrow_parent:
            # Sorts after every other .pth here; plain path lines only.
            (venv.site / "zzzz_borrow_parent_env.pth").write_text(
                "".join(d + "\n" for d in _parent_site_dirs())
            )
            for script, module in CLIS.items():
                wrapper = venv.bin / script
                wrapper.write_text(
                    f"#!{venv.python}\n"
                    "import sys\n"
                    f"from {module} import main\n"
                    "if __name__ == '__main__':\n"
                    "    sys.exit(main())\n"
                )
                wrapper.chmod(0o755)
        return venv

    # Run from the venv's own directory: `python -c` puts the working
    # directory first on sys.path, and the repository must not leak in.
    def pip(self, *args):
        return _run(
            [sys.executable, "-m", "pip", "--python", self.python, *args], cwd=self.root, timeout=600
        )

    def py(self, code, *flags, env=None, check=True):
        return _run(
            [self.python, *flags, "-c", textwrap.dedent(code)], env=env, cwd=self.root, check=check
        )


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _copy_project(tmp_path_factory.mktemp("install") / "project")


@pytest.fixture(scope="module")
def wheel(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, project], cwd=out, timeout=600)
    (whl,) = out.glob("mergekit_cabs-*.whl")
    return whl


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, built by hatchling (installed into a venv of its own) from a
    copy of everything the sdist is to carry."""
    root = tmp_path_factory.mktemp("sdist")
    project = _copy_project(root / "project", dirs=("mergekit_cabs", *SDIST_DIRS))
    for name in SDIST_FILES:
        shutil.copy2(REPO_ROOT / name, project / name)
    venv = Venv.create(root / "venv", borrow_parent=False)
    venv.pip("install", "-q", "hatchling>=1.27")
    out = root / "dist"
    _run([venv.python, "-m", "hatchling", "build", "-t", "sdist", "-d", out], cwd=project, timeout=600)
    (tar,) = out.glob("mergekit_cabs-*.tar.gz")
    return tar


@pytest.fixture(scope="module")
def install_into_fresh_venv(project, tmp_path_factory):
    """Returns mode -> (mode, venv, directory our package must be imported from)."""
    made = {}

    def make(mode):
        if mode not in made:
            venv = Venv.create(tmp_path_factory.mktemp(f"venv-{mode}") / "venv")
            if mode == "editable":
                venv.pip("install", "--no-deps", "-q", "-e", project)
                pkg_dir = project / "mergekit_cabs"
            else:
                venv.pip("install", "--no-deps", "-q", project)
                pkg_dir = venv.site / "mergekit_cabs"
            assert (venv.site / PTH_NAME).is_file(), f"{PTH_NAME} not installed ({mode})"
            made[mode] = (mode, venv, pkg_dir)
        return made[mode]

    return make


@pytest.fixture(scope="module", params=["wheel", "editable"])
def installed(request, install_into_fresh_venv):
    """`pip install .` and `pip install -e .`, each in its own fresh venv."""
    return install_into_fresh_venv(request.param)


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    """A tiny Llama base and one fine-tune (no tokenizer), float32."""
    from tiny_models import make_tiny_llama

    root = tmp_path_factory.mktemp("install_models")
    base = make_tiny_llama(root / "base", seed=7, layers=1, tokenizer=False)
    tune = make_tiny_llama(root / "tune", seed=8, layers=1, base=base, scale=2, tokenizer=False)
    return base, tune


def _check_sparse_delta(base_state, out_state):
    """Each merged tensor differs from the base in at most N_KEEP of BLOCK places per block."""
    changed = 0
    for name, b in base_state.items():
        delta = (out_state[name].float() - b.float()).flatten()
        nnz = int((delta != 0).sum())
        blocks = -(-delta.numel() // BLOCK)
        assert nnz <= blocks * N_KEEP, (name, nnz, blocks)
        changed += nnz
    assert changed > 0


# --------------------------------------------------------------------------
# the built artefacts


def test_wheel_holds_only_the_package_and_the_pth(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        pth = zf.read(PTH_NAME).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "mergekit-cabs = mergekit_cabs.cli:main" in scripts
    payload = [n for n in names if ".dist-info/" not in n]
    assert PTH_NAME in payload
    strays = [n for n in payload if n != PTH_NAME and not n.startswith("mergekit_cabs/")]
    assert strays == []
    assert "mergekit_cabs/_autoload.py" in payload
    assert pth.count("\n") == 1 and pth.endswith("\n"), "the .pth must be one line"
    assert pth.startswith("import sys;")


def test_editable_pth_sorts_after_the_path_pth(installed):
    mode, venv, _ = installed
    pths = sorted(p.name for p in venv.site.glob("*.pth"))
    if mode == "editable":
        path_pths = [p for p in pths if p not in (PTH_NAME, "zzzz_borrow_parent_env.pth")]
        assert path_pths, pths
        assert all(p < PTH_NAME for p in path_pths), pths


def _numba_requirements(metadata):
    found = {}
    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.name == "numba":
            marker = str(req.marker) if req.marker else ""
            extra = re.search(r'extra == "([^"]+)"', marker)
            found[extra.group(1) if extra else None] = req
    return found


# platform, machine, Python: does plain `pip install mergekit-cabs` bring numba?
NUMBA_WHEELS = [
    ("linux", "x86_64", "3.10", True),
    ("linux", "x86_64", "3.15", True),
    ("linux", "aarch64", "3.12", True),
    ("win32", "AMD64", "3.11", True),
    ("darwin", "arm64", "3.13", True),
    ("darwin", "x86_64", "3.12", False),  # numba has no Intel macOS wheels since 0.62
    ("win32", "ARM64", "3.12", False),
    ("linux", "ppc64le", "3.12", False),
    ("linux", "x86_64", "3.16", False),  # not yet released by numba
]


def test_wheel_metadata(wheel):
    """Version from __init__.py, the licence, numba where it has wheels, the extras."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = _metadata(zf.read(meta_name).decode())
        dist_info = meta_name.rsplit("/", 1)[0]
        licence = zf.read(f"{dist_info}/licenses/LICENSE").decode()
    assert wheel.name.startswith(f"mergekit_cabs-{VERSION}-")
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert licence == (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence

    numba = _numba_requirements(meta)
    assert set(numba) == {None, "fast", "test"}, numba
    for platform, machine, python, wanted in NUMBA_WHEELS:
        env = {"sys_platform": platform, "platform_machine": machine, "python_version": python, "extra": ""}
        assert numba[None].marker.evaluate(env) is wanted, (platform, machine, python)
    # `[fast]` still works, and asks for numba wherever it is used
    assert numba["fast"].specifier == numba[None].specifier
    assert numba["fast"].marker.evaluate({"extra": "fast", "platform_machine": "ppc64le"})
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    test_extra = {r.name for r in requirements if "extra ==" in str(r.marker) and r.marker.evaluate({"extra": "test"})}
    assert test_extra >= {"pytest", "numba", "matplotlib", "ruff"}, test_extra


def test_sdist_carries_licence_and_builds(sdist, tmp_path):
    """The sdist holds the licence and what a build needs; a wheel built from it is whole."""
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
        (pkg_info,) = [m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
        meta = _metadata(tf.extractfile(pkg_info).read().decode())
    for name in [*BUILD_FILES, *SDIST_FILES, "mergekit_cabs/__init__.py", "tests/conftest.py", "docs/generate.py"]:
        assert name in names, (name, sorted(names))
    assert any(n.startswith("example_configs/") for n in names)
    assert not [n for n in names if "__pycache__" in n]
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, sdist], cwd=tmp_path, timeout=600)
    (whl,) = tmp_path.glob("mergekit_cabs-*.whl")
    with zipfile.ZipFile(whl) as zf:
        built = zf.namelist()
    assert PTH_NAME in built
    assert f"mergekit_cabs-{VERSION}.dist-info/licenses/LICENSE" in built


def test_installed_version(installed):
    mode, venv, _ = installed
    (dist_info,) = venv.site.glob("mergekit_cabs-*.dist-info")
    assert dist_info.name == f"mergekit_cabs-{VERSION}.dist-info"
    assert _metadata((dist_info / "METADATA").read_text())["Version"] == VERSION
    proc = venv.py(
        """
        import importlib.metadata, mergekit_cabs
        print(importlib.metadata.version("mergekit-cabs"), mergekit_cabs.__version__)
        """
    )
    assert proc.stdout.split() == [VERSION, VERSION], mode


# --------------------------------------------------------------------------
# start-up and import order


def test_startup_imports_nothing_heavy(installed):
    mode, venv, _ = installed
    proc = venv.py("pass", "-X", "importtime")
    lines = proc.stderr.splitlines()
    assert all(line.startswith("import time:") for line in lines), lines
    modules = [line.split("|")[-1].strip() for line in lines[1:]]
    assert "mergekit_cabs._autoload" in modules, "the .pth did not run"
    heavy = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], heavy
    assert proc.stdout == ""


def test_plain_mergekit_sees_cabs(installed):
    """Nothing but the .pth: importing mergekit's methods registers cabs."""
    mode, venv, pkg_dir = installed
    proc = venv.py(
        """
        import sys
        assert "mergekit_cabs.method" not in sys.modules
        import mergekit.merge_methods as mm
        method = mm.get("cabs")
        import mergekit_cabs
        from mergekit_cabs._autoload import CabsAutoloadFinder, _WrappedLoader
        assert not any(isinstance(f, CabsAutoloadFinder) for f in sys.meta_path), sys.meta_path
        assert not isinstance(mm.__loader__, _WrappedLoader)
        assert not isinstance(mm.__spec__.loader, _WrappedLoader)
        # importing the package after mergekit, and extra installs, are harmless
        mergekit_cabs.install()
        mergekit_cabs.install()
        assert mm.get("cabs") is method is mergekit_cabs.cabs_method
        assert [m.spec.name for m in mm.registered_methods()].count("cabs") == 1
        print(mergekit_cabs.__file__)
        """
    )
    assert Path(proc.stdout.strip()).parent == pkg_dir


def test_import_mergekit_cabs_first(installed):
    mode, venv, pkg_dir = installed
    proc = venv.py(
        """
        import mergekit_cabs, sys
        assert "torch" not in sys.modules and "mergekit" not in sys.modules
        from mergekit.merge_methods import get
        assert get("cabs") is mergekit_cabs.cabs_method
        mergekit_cabs.install()
        assert get("cabs") is mergekit_cabs.cabs_method
        print(mergekit_cabs.__file__)
        """
    )
    assert Path(proc.stdout.strip()).parent == pkg_dir


@pytest.mark.parametrize("first", ["mergekit_cabs", "mergekit"])
def test_without_pth_import_registers(installed, first):
    """``python -S`` skips every .pth: ``import mergekit_cabs`` alone must do."""
    mode, venv, pkg_dir = installed
    where = str(pkg_dir.parent)
    env = _env(PYTHONPATH=os.pathsep.join([where, *_parent_site_dirs()]))
    if first == "mergekit":
        code = """
        import sys
        assert "mergekit_cabs" not in sys.modules
        import mergekit.merge_methods as mm
        assert "cabs" not in [m.spec.name for m in mm.registered_methods()]
        import mergekit_cabs
        assert mm.get("cabs") is mergekit_cabs.cabs_method
        print(mergekit_cabs.__file__)
        """
    else:
        code = """
        import sys
        assert "mergekit_cabs" not in sys.modules
        import mergekit_cabs
        import mergekit.merge_methods as mm
        assert mm.get("cabs") is mergekit_cabs.cabs_method
        print(mergekit_cabs.__file__)
        """
    proc = venv.py(code, "-S", env=env)
    assert Path(proc.stdout.strip()).parent == pkg_dir


# --------------------------------------------------------------------------
# mergekit's own command-line tools


def test_mergekit_yaml_merges_with_cabs(installed, tiny_family, tmp_path):
    mode, venv, _ = installed
    base, tune = tiny_family
    config = tmp_path / "cabs.yml"
    config.write_text(
        f"merge_method: cabs\nbase_model: {base.path}\ndtype: float32\n"
        f"parameters:\n  block_size: {BLOCK}\n"
        f"models:\n  - model: {tune.path}\n    parameters:\n      n: {N_KEEP}\n"
    )
    out = tmp_path / "out"
    _run([venv.bin / "mergekit-yaml", config, out, "--no-copy-tokenizer"], cwd=tmp_path)
    _check_sparse_delta(base.state, load_file(str(out / "model.safetensors")))


def test_mergekit_multi_checks_cabs_parameters(installed, tiny_family, tmp_path):
    """A bad cabs parameter gets cabs' own error, not 'Unimplemented merge method'."""
    mode, venv, _ = installed
    base, tune = tiny_family
    config = tmp_path / "multi.yml"
    config.write_text(
        f"merge_method: cabs\nbase_model: {base.path}\n"
        f"models:\n  - model: {tune.path}\n    parameters:\n      density: 1.5\n"
    )
    proc = _run(
        [venv.bin / "mergekit-multi", config, "--out-path", tmp_path / "out", "-I", tmp_path / "inter"],
        cwd=tmp_path,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Unimplemented merge method" not in output
    assert "density" in output and "cabs" in output, output[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_mergekit_pytorch_merges_with_cabs(installed, tmp_path):
    mode, venv, _ = installed
    gen = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(8, 32, generator=gen), "b": torch.randn(37, generator=gen)}
    tune = {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tune, str(tmp_path / "tune.safetensors"))
    config = tmp_path / "raw.yml"
    config.write_text(
        json.dumps(
            {
                "merge_method": "cabs",
                "base_model": str(tmp_path / "base.safetensors"),
                "parameters": {"block_size": BLOCK},
                "models": [{"model": str(tmp_path / "tune.safetensors"), "parameters": {"n": N_KEEP}}],
            }
        )
    )
    out = tmp_path / "out"
    _run([venv.bin / "mergekit-pytorch", config, out], cwd=tmp_path)
    (shard,) = out.glob("*.safetensors")
    merged = load_file(str(shard))
    _check_sparse_delta(base, merged)


# --------------------------------------------------------------------------
# failure modes of the hook


_BROKEN_PLUGIN = """
import sys, types
import mergekit_cabs
fake = types.ModuleType("mergekit_cabs.method")
def install():
    raise RuntimeError("simulated breakage")
fake.install = install
sys.modules["mergekit_cabs.method"] = fake
import mergekit.merge_methods as mm
print("methods:", len(mm.registered_methods()), "cabs" in [m.spec.name for m in mm.registered_methods()])
"""


def test_broken_plugin_warns_once_and_mergekit_still_works(install_into_fresh_venv):
    _, venv, _ = install_into_fresh_venv("wheel")
    env = _env()
    env.pop("MERGEKIT_CABS_STRICT")
    proc = venv.py(_BROKEN_PLUGIN, env=env)
    assert proc.stdout.strip().endswith("False"), proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mergekit-cabs:") and "simulated breakage" in lines[0]


def test_broken_plugin_raises_when_strict(install_into_fresh_venv):
    _, venv, _ = install_into_fresh_venv("wheel")
    proc = venv.py(_BROKEN_PLUGIN, check=False)
    assert proc.returncode != 0
    assert "simulated breakage" in proc.stderr
    assert "methods:" not in proc.stdout


def test_leftover_pth_without_package_is_silent(tmp_path):
    venv = Venv.create(tmp_path / "venv", borrow_parent=False)
    shutil.copy2(REPO_ROOT / PTH_NAME, venv.site / PTH_NAME)
    proc = venv.py("import sys; print('mergekit_cabs' in sys.modules)")
    assert proc.stdout.strip() == "False"
    assert proc.stderr == ""


def test_uninstall_removes_the_pth(wheel, tmp_path):
    venv = Venv.create(tmp_path / "venv", borrow_parent=False)
    venv.pip("install", "--no-deps", "-q", wheel)
    assert (venv.site / PTH_NAME).is_file()
    venv.pip("uninstall", "-y", "-q", "mergekit-cabs")
    assert not (venv.site / PTH_NAME).exists()
    assert not (venv.site / "mergekit_cabs").exists()
    assert venv.py("pass").stderr == ""
