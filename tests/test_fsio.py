"""Safe writes: only regular files are ever replaced, permissions follow the umask, errors are one line."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import OutputError
from harness.fsio import safe_name, safe_write
from harness.store import SQLiteStore

from test_aggregate import VARIANTS, fixture_records

REPO = Path(__file__).resolve().parents[1]


def make_store(path: Path, *, sweep: str = "fx") -> Path:
    with SQLiteStore(path) as store:
        records = fixture_records()
        for record in records:
            store.put(record)
        info = {"variants": VARIANTS, "seeds": [0, 1, 2], "dataset": {"name": "mnist", "n_train": 100, "n_test": 10}}
        store.save_plan(sweep, source="sweeps/fx.yaml", info=info, runs=[(r.run_id, r.variant, r.seed) for r in records])
    return path


def invoke(*args, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("harness: error: ") and "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- the function


def test_new_file_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = safe_write(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600


def test_replacing_a_regular_file_keeps_its_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o604)
    safe_write(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_fifo_symlink_directory_and_socket_are_refused_untouched(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.txt"
    target.write_text("precious")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    folder = tmp_path / "folder.md"
    folder.mkdir()
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in [(fifo, "FIFO"), (link, "symbolic link"), (folder, "directory"), (sock_path, "socket")]:
            with pytest.raises(OutputError, match=kind) as info:
                safe_write(path, "x")
            assert str(path) in str(info.value) and "\n" not in str(info.value)
    finally:
        sock.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and folder.is_dir()
    assert target.read_text() == "precious"
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name",
    ["../../etc/x", "a/b", "/abs/olute", "..", ".", "", "x" * 400, "é" * 200, "name with spaces", "nul\x00byte"],
)
def test_safe_name_stays_one_file_name(name: str) -> None:
    cleaned = safe_name(name)
    assert cleaned and "/" not in cleaned and not cleaned.startswith(".") and "\x00" not in cleaned
    assert len(cleaned.encode()) <= 120
    assert (Path("reports") / cleaned).resolve().parent == Path("reports").resolve()


def test_safe_name_keeps_plain_names_and_never_merges_two() -> None:
    assert safe_name("conv_table") == "conv_table" and safe_name("nightly-2.1") == "nightly-2.1"
    assert safe_name("a/b") != safe_name("a_b") and safe_name("x" * 300) != safe_name("x" * 301)


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("command", ["report", "export", "baseline", "regress"])
def test_out_fifo_symlink_devnull_are_refused(command: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "h.db")
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    target = tmp_path / "target.md"
    target.write_text("precious")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    base = None
    if command == "regress":
        base = tmp_path / "base.json"
        assert invoke("baseline", "save", "--sweep", "fx", "--store", store, "--out", base).exit_code == 0
    for out in [fifo, link, Path("/dev/null")]:
        before = os.lstat(out)
        if command == "report":
            args = ["report", "--sweep", "fx", "--no-plots"]
        elif command == "export":
            args = ["export", "--sweep", "fx"]
        elif command == "baseline":
            args = ["baseline", "save", "--sweep", "fx"]
        else:
            args = ["regress", "--sweep", "fx", "--baseline", base]
        line = one_error_line(invoke(*args, "--store", store, "--out", out))
        assert str(out) in line and "only ever replaces regular files" in line
        after = os.lstat(out)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert target.read_text() == "precious"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    line = one_error_line(invoke(*args, "--store", store, "--out", tmp_path))
    assert str(tmp_path) in line and "is a directory" in line


def test_default_report_paths_stay_in_reports_whatever_the_sweep_is_called(tmp_path: Path) -> None:
    hostile = "../../escaped/" + "y" * 300
    store = make_store(tmp_path / "h.db", sweep=hostile)
    work = tmp_path / "work"
    work.mkdir()
    for args in (["report", "--no-plots"], ["report", "--format", "csv"], ["export"], ["baseline", "save", "--sweep", hostile]):
        result = invoke(*args, "--store", store, cwd=work)
        assert result.exit_code == 0, result.output
    written = [p for p in work.rglob("*") if p.is_file()]
    assert len(written) == 4  # .md, its summary.csv, .csv (report --format csv and export write the same file), .json
    for path in written:
        assert path.resolve().is_relative_to((work / "reports").resolve())
    assert not (tmp_path / "escaped").exists()


def test_out_without_suffix_is_written_as_named_with_plots_beside_it(tmp_path: Path) -> None:
    store = make_store(tmp_path / "h.db")
    for _ in range(2):  # and again: the second run replaces its own files
        result = invoke("report", "--sweep", "fx", "--store", store, "--out", tmp_path / "summary")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "summary").is_file() and (tmp_path / "summary_plots").is_dir()
    assert "](summary_plots/" in (tmp_path / "summary").read_text()
    assert f"wrote {tmp_path / 'summary'}" in result.output
    assert invoke("export", "--sweep", "fx", "--store", store, "--out", tmp_path / "runs").exit_code == 0
    assert (tmp_path / "runs").read_text().startswith("sweep,run_id")


def test_report_files_follow_the_umask(tmp_path: Path) -> None:
    store = make_store(tmp_path / "h.db")
    old = os.umask(0o022)
    try:
        result = invoke("report", "--sweep", "fx", "--store", store, "--out", tmp_path / "r.md")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    files = [tmp_path / "r.md", *(tmp_path / "r").iterdir()]
    assert len(files) > 1
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def _can_mount() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root or user namespaces)")
@pytest.mark.parametrize("case", ["full", "readonly"])
def test_full_disk_and_read_only_folder_are_one_line(case: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "h.db")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if case == "full":
        prepare = f"mount -t tmpfs -o size=64k tmpfs {mnt} && (dd if=/dev/zero of={mnt}/fill bs=1k count=200 2>/dev/null; true)"
    else:
        prepare = f"mount -t tmpfs -o size=64k tmpfs {mnt} && echo old > {mnt}/r.csv && mount -o remount,ro {mnt}"
    command = f"{prepare} && {sys.executable} -m harness export --sweep fx --store {store} --out {mnt}/r.csv; echo rc=$?; cat {mnt}/r.csv 2>/dev/null | head -c 20; ls -a {mnt}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120, env=env)
    assert "rc=2" in done.stdout, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    reason = "the disk is full" if case == "full" else "read-only"
    assert f"{mnt}/r.csv" in lines[0] and reason in lines[0], lines[0]
    if case == "readonly":
        assert "old" in done.stdout  # the file there is untouched
    assert ".tmp" not in done.stdout  # no temp file left behind
