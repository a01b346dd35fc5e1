"""Publishing folders with ``atomic_dir``: concurrent publishers, refusals, stale staging folders.

Subprocesses load ``atomic.py`` by itself (it needs only the standard library), so each starts in
a fraction of a second instead of importing torch through the package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from osscar_export import atomic
from osscar_export.atomic import DestinationExists, atomic_dir, sweep_staging

# argv: atomic.py, target, publishes, tag; prints the outcome of each publish as JSON.
PUBLISHER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
outcomes = []
for i in range(int(sys.argv[3])):
    try:
        with atomic.atomic_dir(sys.argv[2]) as d:
            for name in "abc":
                (d / name).write_text(f"{sys.argv[4]}-{i}")
        outcomes.append("ok")
    except Exception as e:
        outcomes.append(repr(e))
print(json.dumps(outcomes))
"""

# argv: atomic.py, target; stages a file, prints the staging folder and is SIGKILLed before publishing.
KILLED = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_dir(sys.argv[2]) as d:
    (d / "model.onnx").write_bytes(b"x" * 1000)
    print(d, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _publish(target: Path, tag: str, may_replace: Callable[[Path], bool] = lambda _: True) -> str:
    """One publish of files a, b, c holding ``tag``: "ok", "refused" or the unexpected error."""
    try:
        with atomic_dir(target, may_replace) as d:
            for name in "abc":
                (d / name).write_text(tag)
    except DestinationExists:
        return "refused"
    except Exception as e:  # noqa: BLE001 - the test reports every failure, whatever it is
        return repr(e)
    return "ok"


def _assert_complete(target: Path) -> str:
    """The published folder holds one publish whole, and nothing is left beside it."""
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert sorted(contents) == ["a", "b", "c"] and len(set(contents.values())) == 1, contents
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    return contents["a"]


def test_concurrent_replacing_publishes_all_succeed(tmp_path: Path) -> None:
    """Two processes and four threads publish the same folder 360 times; before the lock and the
    exchange, 30 to 44 of these 360 failed in each of 3 runs (ENOTEMPTY, FileNotFoundError)."""
    target = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, atomic.__file__, str(target), "80", f"p{k}"],
                              stdout=subprocess.PIPE, text=True) for k in range(2)]
    outcomes: list[str] = []

    def publisher(k: int) -> None:
        outcomes.extend(_publish(target, f"t{k}-{i}") for i in range(50))

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        outcomes += json.loads(out)
    assert len(outcomes) == 360
    assert [o for o in outcomes if o != "ok"] == []
    _assert_complete(target)


def test_without_renameat2_the_lock_keeps_publishes_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the C library or the filesystem lacks renameat2, two renames under the lock replace."""
    monkeypatch.setattr(atomic, "_renameat2", None)
    target = tmp_path / "out"
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda k=k: outcomes.extend(_publish(target, f"t{k}-{i}") for i in range(40)))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["ok"] * 160
    _assert_complete(target)
    assert _publish(target, "refused", may_replace=lambda _: False) == "refused"


def test_concurrent_publishes_without_replace_one_wins(tmp_path: Path) -> None:
    """Publishers that may not replace: exactly one succeeds, the others are refused and the
    winner's folder stays whole."""
    target = tmp_path / "out"
    start = threading.Barrier(6)
    outcomes: dict[str, str] = {}

    def publisher(tag: str) -> None:
        start.wait()
        outcomes[tag] = _publish(target, tag, may_replace=lambda _: False)

    threads = [threading.Thread(target=publisher, args=(f"t{k}",)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [tag for tag, o in outcomes.items() if o == "ok"]
    assert len(winners) == 1 and sorted(outcomes.values()) == ["ok"] + ["refused"] * 5, outcomes
    assert _assert_complete(target) == winners[0]


def test_a_destination_that_appeared_meanwhile_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(DestinationExists):
        with atomic_dir(target, may_replace=lambda _: False) as staging:
            (staging / "a").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_destination_or_a_permitted_one_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    assert _publish(target, "first", may_replace=lambda _: False) == "ok"
    asked: list[Path] = []
    assert _publish(target, "second", may_replace=lambda p: asked.append(p) is None) == "ok"
    assert asked == [target]
    assert _assert_complete(target) == "second"


def _killed_publisher(target: Path) -> Path:
    """The staging folder a publisher SIGKILLed before publishing left behind."""
    killed = subprocess.run([sys.executable, "-c", KILLED, atomic.__file__, str(target)],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    stale = Path(killed.stdout.strip())
    assert stale.parent == target.parent and stale.name.startswith(f".{target.name}.staging-")
    assert (stale / "model.onnx").exists()
    return stale


def test_stale_staging_of_a_killed_process_is_swept_a_live_one_kept(tmp_path: Path) -> None:
    """A SIGKILL skips every ``finally``: its staging folder stays until a later sweep, by a job
    at its start or by the next ``atomic_dir``. A live publisher's (its lock held) is kept."""
    target = tmp_path / "out"
    stale = _killed_publisher(target)
    assert sweep_staging(target) == [stale] and not stale.exists()
    stale = _killed_publisher(target)
    with atomic_dir(target) as live:
        assert not stale.exists()
        (live / "a").write_text("1")
        assert sweep_staging(target) == []
        assert (live / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sweep_leaves_other_folders_alone(tmp_path: Path) -> None:
    """Only this destination's staging names are candidates; a missing parent is nothing to sweep."""
    for name in (".out.staging-1-abc.x", ".other.staging-1-abc", ".out.old", "out"):
        (tmp_path / name).mkdir()
    assert sweep_staging(tmp_path / "out") == []
    assert len(list(tmp_path.iterdir())) == 4
    assert sweep_staging(tmp_path / "missing" / "out") == []
