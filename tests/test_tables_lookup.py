"""Where latency tables are found and saved: the shipped ones from any working directory, new
ones in the user cache, never in the working directory, and never lost to a read-only folder."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import pytest
import setuptools

from osscar_export.latency import table
from osscar_export.latency.build import measure_latency
from osscar_export.latency.table import lookup_dirs, table_path
from osscar_export.targets import get_target
from tests.test_latency_fit import counting_machine, tiny_mlp_lm  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty folder outside the repository, with the user cache under ``tmp_path``."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "cache"))
    return cwd


def widths(plan) -> dict[str, list[int]]:
    return {g.name: [8, 128, g.count] if g.kind == "neuron" else [g.count] for g in plan.groups}


def test_shipped_tables_are_found_from_any_working_directory(tiny_mlp_lm, counting_machine, elsewhere, tmp_path, monkeypatch):
    shipped = {p.name for p in (REPO / "latency_tables").glob("*.json")}
    assert shipped and any(shipped <= {p.name for p in d.glob("*.json")} for d in lookup_dirs())

    # a table shipped for this machine is re-used, nothing is measured or written
    target = get_target("ort-cpu")
    made = measure_latency(tiny_mlp_lm, target, widths(tiny_mlp_lm), cache_dir=tmp_path / "shipped")
    monkeypatch.setattr(table, "shipped_dirs", lambda: [tmp_path / "shipped"])
    counting_machine.clear()
    assert measure_latency(tiny_mlp_lm, target, widths(tiny_mlp_lm), cache_dir=lookup_dirs()) == made
    assert counting_machine == []
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_a_new_table_goes_to_the_user_cache(tiny_mlp_lm, counting_machine, elsewhere, tmp_path, monkeypatch):
    monkeypatch.setattr(table, "shipped_dirs", lambda: [])
    target = get_target("ort-cpu")
    made = measure_latency(tiny_mlp_lm, target, widths(tiny_mlp_lm), cache_dir=lookup_dirs())
    saved = table_path(tmp_path / "cache" / "latency_tables", target.for_inputs(tiny_mlp_lm.example_inputs), made.model_signature)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no partial file left either
    assert list(elsewhere.iterdir()) == []


def test_a_read_only_tables_folder_falls_back_to_the_user_cache(tiny_mlp_lm, counting_machine, elsewhere, tmp_path, monkeypatch):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root writes through 0o555: refuse as the file system would
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(table, "shipped_dirs", lambda: [])
    target = get_target("ort-cpu")
    logged: list[str] = []
    made = measure_latency(tiny_mlp_lm, target, widths(tiny_mlp_lm), cache_dir=lookup_dirs(read_only), log=logged.append)
    user = tmp_path / "cache" / "latency_tables"
    assert any(f"cannot write latency tables to {read_only}" in m and str(user) in m for m in logged)
    assert list(read_only.iterdir()) == []
    assert [p.name for p in user.iterdir()] == [table_path(user, target.for_inputs(tiny_mlp_lm.example_inputs), made.model_signature).name]
    counting_machine.clear()
    assert measure_latency(tiny_mlp_lm, target, widths(tiny_mlp_lm), cache_dir=lookup_dirs(read_only)) == made
    assert counting_machine == []  # found in the user cache


def test_wheels_carry_every_package_and_the_shipped_tables():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(REPO), include=["osscar_export*"])
    assert sorted(config["packages"]) == sorted([*found, "osscar_export.latency_tables"])
    assert config["package-dir"] == {"osscar_export.latency_tables": "latency_tables"}
    assert config["package-data"]["osscar_export.latency_tables"] == ["*.json"]
