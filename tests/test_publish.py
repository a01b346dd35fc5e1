"""The job's output folder: checked before any work, checked again when publishing, never
replaced behind the user's back (docs/design.md, "Pipeline")."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest

from osscar_export import pipeline
from osscar_export.cli import main
from osscar_export.errors import OsscarError
from osscar_export.job import JobConfig
from osscar_export.output_dir import check_output_dir, check_writable, publishing
from tests.test_cli import _args as job_args


def _args(tiny: dict[str, str], out: Path | str, *extra: str) -> list[str]:
    return job_args(tiny, Path(out), "--no-search", "--mode", "dense", "--speedup", "1.3", *extra)


def _message(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any check that is not done before the job's work fails the test instead of running it."""
    def prepare(*_: object, **__: object) -> None:
        raise AssertionError("the job started its work before refusing")

    monkeypatch.setattr(pipeline, "prepare", prepare)


def test_out_dot_is_refused_at_the_start(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture, no_work: None) -> None:
    """``--out .`` used to run the whole job, then fail on "PosixPath('.') has an empty name"; with
    --force it would replace the folder the user works in."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in (".", "./", "..", "x/.."):
        with pytest.raises(OsscarError, match="is the current folder or one above it"):
            check_output_dir(Path(out), force=True)
    assert check_output_dir(Path("x/../out"), force=False) == tmp_path / "sub" / "out"
    assert main(_args(tiny, ".")) == 2
    assert "--out . is the current folder or one above it" in _message(capsys)


def test_unwritable_output_parent_is_refused_at_the_start(tiny: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                          no_work: None) -> None:
    """A parent that is a file, or a folder this user may not write (``os.access``: permission bits
    do not stop root, so the test says what access reports)."""
    (tmp_path / "file").write_text("x")
    assert main(_args(tiny, tmp_path / "file" / "sub" / "out")) == 2
    assert f"cannot be created: {tmp_path / 'file'} is a file, not a folder; choose another --out" in _message(capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    assert main(_args(tiny, locked / "new" / "out")) == 2
    assert f"is not writable: this user cannot create files in {locked}; choose another --out" in _message(capsys)
    assert list(locked.iterdir()) == []


def test_unwritable_cache_is_refused_at_the_start(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture, no_work: None) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "file" / "cache"))
    assert main(_args(tiny, tmp_path / "out")) == 2
    assert "the cache folder" in (err := _message(capsys)) and "set OSSCAR_CACHE to a writable folder" in err
    assert not (tmp_path / "out").exists()


def test_check_writable_walks_up_to_what_exists(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b" / "c", "folder", "fix")
    assert not (tmp_path / "a").exists(), "checking creates nothing"


def test_force_replaces_only_an_earlier_result(tmp_path: Path) -> None:
    """--force on a folder of other files would delete them; it is refused at the start and at publish time."""
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OsscarError, match="did not write"):
        check_output_dir(mine, force=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text("{}")
    assert check_output_dir(earlier, force=True) == earlier
    with publishing(earlier, force=True) as staging:
        (staging / "report.json").write_text('{"new": 1}')
    assert [p.name for p in earlier.iterdir()] == ["report.json"] and "new" in (earlier / "report.json").read_text()


@pytest.mark.parametrize(("force", "reason"), [(False, "pass --force"), (True, "did not write")])
def test_publishing_refuses_a_folder_that_appeared_meanwhile(tmp_path: Path, force: bool, reason: str) -> None:
    out = tmp_path / "out"
    check_output_dir(out, force)
    with pytest.raises(OsscarError, match="was written by another process while this job ran") as e:
        with publishing(out, force) as staging:
            (staging / "model.onnx").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert reason in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_second_identical_job_does_not_replace_the_first(tiny: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Two identical jobs with one --out: the first to finish publishes; the other, which passed
    the start check before that folder existed, is refused when it publishes. Both used to succeed,
    the later silently replacing the earlier."""
    first = tmp_path / "first"
    assert main(_args(tiny, first)) == 0
    out = tmp_path / "out"
    prepare = pipeline.prepare

    def first_job_finishes_meanwhile(*args: object, **kwargs: object) -> object:
        shutil.copytree(first, out)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", first_job_finishes_meanwhile)
    capsys.readouterr()
    assert main(_args(tiny, out)) == 2
    assert (f"--out {out} was written by another process while this job ran, so this job's results were discarded: "
            "it already holds files; pass --force to replace them or choose another folder") in _message(capsys)
    monkeypatch.setattr(pipeline, "prepare", prepare)
    assert main(_args(tiny, out)) == 2  # the same command again: refused before any work
    assert f"--out {out} already holds files; pass --force" in _message(capsys)
    compared = filecmp.dircmp(first, out)
    assert compared.left_list == compared.right_list and not compared.diff_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out"]


def test_job_start_sweeps_staging_folders_of_killed_jobs(tmp_path: Path, no_work: None) -> None:
    """A job SIGKILLed while exporting leaves its staging folder (no lock held any more); the next
    job for that --out removes it before its own work, and says so."""
    stale = tmp_path / ".out.staging-4194305-abc123xy"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"x" * 1000)
    logs: list[str] = []
    with pytest.raises(AssertionError, match="started its work"):
        pipeline.run_job(JobConfig(model="unused", speedup=(1.3,), out=tmp_path / "out"), log=logs.append)
    assert not stale.exists()
    assert logs == [f"removed {stale}, the staging folder of an earlier job that was killed"]
