"""The job's output folder: refused at the start when writing there would lose work or files,
and published atomically at the end (docs/design.md, "Pipeline", output)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from osscar_export.atomic import DestinationExists, atomic_dir
from osscar_export.errors import OsscarError


def _refusal(out: Path, force: bool) -> str | None:
    """Why the job's results may not become ``out``, or None. ``--force`` replaces only a folder
    this tool wrote (it holds report.json): forcing onto a folder of other files (say ``--out ~``)
    would delete them."""
    if os.path.lexists(out) and not out.is_dir():
        return "exists and is not a folder"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not force:
        return "already holds files; pass --force to replace them or choose another folder"
    if not (out / "report.json").is_file():
        return ("holds files that osscar-export did not write (it has no report.json); --force only replaces "
                "an earlier result: empty the folder yourself or choose another one")
    return None


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse at the start a ``folder`` that cannot be created or written, rather than finding out
    when the job writes there at its end and loses everything it computed."""
    existing = folder
    while not os.path.exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise OsscarError(f"{what} {folder} cannot be created: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OsscarError(f"{what} {folder} is not writable: this user cannot create files in {existing}; {fix}")


def check_output_dir(out: Path, force: bool) -> Path:
    """``out`` made absolute (``--out .`` or ``x/..`` have no name of their own), refused when it is
    the current folder or above it (the job replaces its output folder as a whole), when it holds
    files and ``force`` is not given or they are not an earlier result, or when its parent is not
    writable. Checked again when publishing (``publishing``)."""
    absolute = Path(os.path.abspath(out))
    cwd = Path.cwd().resolve()
    if absolute.resolve() == cwd or absolute.resolve() in cwd.parents:
        raise OsscarError(f"--out {out} is the current folder or one above it; the job replaces its output folder "
                          "as a whole, so name a new subfolder, for example --out out")
    reason = _refusal(absolute, force)
    if reason:
        raise OsscarError(f"--out {out} {reason}")
    check_writable(absolute.parent, "--out: the output's parent folder", "choose another --out")
    return absolute


@contextlib.contextmanager
def publishing(out: Path, force: bool) -> Iterator[Path]:
    """A staging folder that becomes ``out`` when the block succeeds. ``out`` is checked again
    then, under the publish lock: a folder that appeared while the job ran (a second identical
    job, say) is refused as at the start, never silently replaced."""
    try:
        with atomic_dir(out, may_replace=lambda p: _refusal(p, force) is None) as staging:
            yield staging
    except DestinationExists:
        reason = _refusal(out, force) or "changed while publishing"
        raise OsscarError(f"--out {out} was written by another process while this job ran, so this job's results "
                          f"were discarded: it {reason}") from None
