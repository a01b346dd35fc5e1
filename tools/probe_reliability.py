#!/usr/bin/env python
"""Probe the job as a new user would, with bad input, signals and concurrent runs, and print one
row per case: the exit code, the message the user sees, and whatever was left behind.

Each case runs ``python -m osscar_export.cli`` on a small MLP defined here (``probe_model``), in
its own output folder, with one cache and one latency-table folder shared by all cases:

- bad budgets, bad calibration files, bad output folders: the exit code and the ``error:`` line;
- SIGINT and SIGKILL during calibration, table building and export, then the same command again:
  it must finish and give the same model (the seed-determined numbers of ``tools/report_numbers.py``)
  as an uninterrupted run;
- two identical jobs at once on one cache: both finish with the same model;
- after every case: hidden staging folders or temporary files left beside the outputs or in the
  cache.

    python tools/probe_reliability.py --work /tmp/probe
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

TOOLS = Path(__file__).resolve().parent


def probe_model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Four MLP blocks, wide enough that calibration, table building and export each take a
    moment (a signal can land inside them)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(128, 10)).eval(), (torch.randn(16, 128),)


@dataclass
class Probe:
    """Where one probe session keeps its files."""

    work: Path

    def env(self, cache: str = "cache") -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(TOOLS), "OSSCAR_CACHE": str(self.work / cache), "COLUMNS": "400"}

    def command(self, out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "osscar_export.cli", "probe_reliability:probe_model", "--calib",
                str(self.work / "calib.pt"), "--n-calib", "12", "--levels", "4", "--tables", str(self.work / "tables"),
                "--out", str(self.work / out), *extra]

    def run(self, args: list[str], cache: str = "cache", timeout: float = 900) -> tuple[int, str]:
        p = subprocess.run(args, env=self.env(cache), capture_output=True, text=True, timeout=timeout, cwd=self.work)
        return p.returncode, p.stdout + p.stderr

    def interrupt(self, args: list[str], marker: str, sig: int, cache: str, timeout: float = 900) -> tuple[int, bool]:
        """Run ``args``, send ``sig`` when the log shows ``marker``; (exit code, whether the signal was sent)."""
        p = subprocess.Popen(args, env=self.env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.work)
        sent = False
        deadline = time.monotonic() + timeout
        assert p.stderr is not None
        for line in p.stderr:
            if marker in line and not sent:
                time.sleep(0.3)
                p.send_signal(sig)
                sent = True
            if time.monotonic() > deadline:
                p.kill()
                break
        return p.wait(), sent

    def numbers(self, out: str) -> str:
        return subprocess.run([sys.executable, str(TOOLS / "report_numbers.py"), str(self.work / out)],
                              capture_output=True, text=True).stdout

    def leftovers(self) -> list[str]:
        """Hidden staging folders and temporary files anywhere under the work folder."""
        found = []
        for path in self.work.rglob("*"):
            name = path.name
            if (name.startswith(".") and path.is_dir()) or ".tmp" in name:
                found.append(str(path.relative_to(self.work)))
        return sorted(found)


def message(output: str) -> str:
    """The line a user reads: the error line, else the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Traceback" in ln]
    return (errors or lines or [""])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--quick", action="store_true", help="only the inputs refused before any work (no job runs)")
    args = ap.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="osscar-probe-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    probe = Probe(work)
    torch.manual_seed(1)
    torch.save([(torch.randn(16, 128),) for _ in range(12)], work / "calib.pt")
    torch.save([(torch.zeros(16, 128),) for _ in range(12)], work / "zeros.pt")
    torch.save([(torch.randn(16, 128).double(),) for _ in range(4)], work / "double.pt")
    torch.save([(torch.randn(10, 128),) for _ in range(4)], work / "ragged.pt")
    (work / "empty.pt").write_bytes(b"")
    (work / "garbage.pt").write_bytes(b"not a tensor file\x00\x01")
    (work / "afile").write_text("x")

    rows: list[tuple[str, str, str, str]] = []

    def case(name: str, args: list[str], want: set[int]) -> tuple[int, str]:
        rc, output = probe.run(args)
        rows.append((name, str(rc) + ("" if rc in want else " (unexpected)"), message(output), ", ".join(probe.leftovers()) or "-"))
        return rc, output

    # refused before any work: quick
    case("--latency-ms -1", probe.command("b1", "--latency-ms", "-1"), {2})
    case("--latency-ms inf", probe.command("b2", "--latency-ms", "inf"), {2})
    case("--latency-ms abc", probe.command("b3", "--latency-ms", "abc"), {2})
    case("--speedup 1.0", probe.command("b4", "--speedup", "1.0"), {2})
    case("--out under a file", probe.command("afile/out", "--speedup", "1.2"), {2})
    case("--out .", probe.command(".", "--speedup", "1.2"), {2})
    for calib in ("missing.pt", "empty.pt", "garbage.pt"):
        args_ = probe.command(f"c-{calib}", "--speedup", "1.2")
        args_[args_.index("--calib") + 1] = str(work / calib)
        case(f"--calib {calib}", args_, {2})
    if not args.quick:
        ref = probe.command("reference", "--speedup", "1.2")
        case("reference run", ref, {0})
        case("--latency-ms 1e-6 (infeasible)", probe.command("b5", "--latency-ms", "1e-6"), {2})
        for calib in ("double.pt", "ragged.pt", "zeros.pt"):
            args_ = probe.command(f"c-{calib}", "--speedup", "1.2")
            args_[args_.index("--calib") + 1] = str(work / calib)
            case(f"--calib {calib}", args_, {0, 2, 3})
        case("--out existing, no --force", probe.command("reference", "--speedup", "1.2"), {2})
        case("--out existing, --force", probe.command("reference", "--speedup", "1.2", "--force"), {0})
        expected = probe.numbers("reference")
        for sig, sig_name in ((signal.SIGINT, "SIGINT"), (signal.SIGKILL, "SIGKILL")):
            for marker, phase in (("calibrating on", "calibration"), ("measuring the latency table", "table building"),
                                  ("exporting", "export")):
                # Each case has its own cache, so its Grams and curves are really computed; the
                # table-building case also measures a fresh table, so its model may differ from the
                # reference (other timings) and it is only required to finish.
                out, cache = f"s-{sig_name}-{phase.replace(' ', '-')}", f"cache-{sig_name}-{phase.replace(' ', '-')}"
                args_ = probe.command(out, "--speedup", "1.2")
                fresh_table = phase == "table building"
                if fresh_table:
                    args_[args_.index("--tables") + 1] = str(work / f"tables-{sig_name}")
                rc, sent = probe.interrupt(args_, marker, sig, cache)
                rerun, output = probe.run(args_, cache)
                same = rerun == 0 and (fresh_table or probe.numbers(out) == expected)
                verdict = ("finished" if fresh_table else "same model as the reference") if same else f"DIFFERENT: {message(output)}"
                rows.append((f"{sig_name} during {phase}, then re-run",
                             f"{rc} then {rerun}" + ("" if sent else " (signal not sent)"), verdict,
                             ", ".join(probe.leftovers()) or "-"))
        both = [subprocess.Popen(probe.command(f"concurrent-{i}", "--speedup", "1.2"), env=probe.env("cache-concurrent"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work) for i in range(2)]
        codes = [p.wait() for p in both]
        same = all(probe.numbers(f"concurrent-{i}") == expected for i in range(2))
        rows.append(("two identical jobs at once, one cache", " and ".join(map(str, codes)),
                     "both give the reference model" if same else "DIFFERENT models", ", ".join(probe.leftovers()) or "-"))

    table = Table(title=f"reliability probe ({work})")
    for col in ("case", "exit", "message", "left behind"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    return 0 if all("unexpected" not in r[1] and "DIFFERENT" not in r[2] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
