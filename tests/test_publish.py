"""Writing the results (`_output.publish`): the staging directory lives inside
--out (so a mount point or a read-only parent work), is gone after any
failure, Ctrl-C or SIGTERM, and a killed run's one is removed by the next run;
a write error is one line; the result file is moved in last.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_cabs._output import STAGING, WriteError, check_out_dir, clean_stale, publish
from mergekit_cabs.cli import main

REPO = Path(__file__).resolve().parent.parent


def leftovers(root: Path) -> list[Path]:
    """Staging directories (ours, or the earlier `.NAME-xxxxxxxx` ones) anywhere under `root`."""
    earlier = re.compile(r"\..+-[a-z0-9_]{8}")
    return [p for p in root.rglob(".*") if p.is_dir() and (p.name.startswith(STAGING) or earlier.fullmatch(p.name))]


def _write(names):
    def build(staging: Path) -> list[str]:
        for name in names:
            (staging / name).write_text(name)
        return list(names)
    return build


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root, with mount rights; else skip)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("needs root and mount (a real small tmpfs)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_failing_write_is_one_line_and_leaves_no_staging_and_no_new_out(tmp_path):
    def full(staging: Path) -> list[str]:
        (staging / "a.txt").write_text("a")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "b.txt"))

    out = tmp_path / "out"
    with pytest.raises(WriteError) as info:
        publish(out, ["a.txt", "b.txt"], full)
    assert str(info.value) == f"could not write {out}: No space left on device"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failing_write_into_an_existing_out_keeps_it_and_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def broken(staging: Path) -> list[str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(WriteError, match="Permission denied"):
        publish(out, ["a.txt"], broken)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_files_are_moved_in_in_the_order_given_so_the_result_comes_last(tmp_path, monkeypatch):
    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b)))
    assert publish(tmp_path / "out", ["x.md", "result.yml"], _write(["x.md", "result.yml"])) == ["x.md", "result.yml"]
    assert moved == ["x.md", "result.yml"] and leftovers(tmp_path) == []


def _config_file(base, tunes, path):
    config = {"merge_method": "cabs", "base_model": str(base.path), "parameters": {"block_size": 16},
              "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes]}
    path.write_text(yaml.safe_dump(config))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _config_file(base, tunes, tmp_path / "c.yml")
    out = tmp_path / "r"
    dead = out / f"{STAGING}{_dead_pid()}-k1ll3d"
    dead.mkdir(parents=True)
    (dead / "report.md").write_text("half")
    legacy = tmp_path / ".r-ab12cd34"  # where releases before this one staged
    legacy.mkdir()
    (legacy / "report.json").write_text("{")
    result = CliRunner().invoke(main, ["analyze", str(path), "--out", str(out), "--quiet"])  # no --force needed
    assert result.exit_code == 0, result.output
    assert not dead.exists() and not legacy.exists() and leftovers(tmp_path) == []
    assert (out / "report.json").exists()


def test_a_live_runs_staging_and_a_users_look_alike_folder_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = out / f"{STAGING}{live.pid}-busy"
        running.mkdir(parents=True)
        mine = tmp_path / ".out-notes123"
        mine.mkdir()
        (mine / "diary.txt").write_text("mine")
        assert clean_stale(out, ["report.json"]) == []
        check_out_dir(out, False, ["report.json"])  # our staging does not count as files in --out
        old = time.time() - 2 * 3600
        os.utime(running, (old, old))
        assert clean_stale(out, ["report.json"]) == [running]  # over an hour: a dead run's, whatever its pid
        assert mine.exists()
    finally:
        live.kill()
        live.wait()


def test_sigterm_while_writing_leaves_no_staging_directory(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    script = (
        "import time, pathlib\n"
        "from mergekit_cabs._output import publish\n"
        "def build(staging):\n"
        "    (staging / 'a.txt').write_text('a')\n"
        f"    pathlib.Path({str(ready)!r}).write_text('')\n"
        "    time.sleep(60)\n"
        f"publish(pathlib.Path({str(out)!r}), ['a.txt'], build)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "publish never started"
        proc.terminate()
        assert proc.wait(30) == 128 + 15
    finally:
        proc.kill()
    assert leftovers(tmp_path) == [] and not out.exists()


@contextlib.contextmanager
def read_only_parent(tmp_path: Path):
    """--out that exists (and is itself a mount point, as root) in a parent nobody may write to."""
    parent = tmp_path / "ro"
    out = parent / "out"
    if os.geteuid() != 0:
        out.mkdir(parents=True)
        parent.chmod(0o555)
        try:
            yield out
        finally:
            parent.chmod(0o755)
        return
    with small_tmpfs(parent, "1m"):
        out.mkdir()
        with small_tmpfs(out, "1m"):
            assert _mount("-o", "remount,ro", str(parent)), "cannot remount read-only"
            yield out


def test_out_on_a_mount_point_in_a_read_only_parent_is_written(tmp_path):
    with read_only_parent(tmp_path) as out:
        assert publish(out, ["a.txt", "b.txt"], _write(["a.txt", "b.txt"])) == ["a.txt", "b.txt"]
        assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]


def test_a_real_full_disk_in_analyze_is_one_line_and_leaves_no_staging(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _config_file(base, tunes, tmp_path / "c.yml")
    with small_tmpfs(tmp_path / "full", "8k") as out:
        result = CliRunner().invoke(main, ["analyze", str(path), "--out", str(out), "--quiet"])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("cabs analyze: "), result.output  # the summary, printed before the write
        assert lines[-1] == (f"Error: analyze: could not write {out}: No space left on device; the summary is "
                             "printed above, the report files were not written")
        assert "Traceback" not in result.output and list(out.iterdir()) == []
