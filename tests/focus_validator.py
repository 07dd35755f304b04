"""The FinOps Foundation's `focus-validator` as a test tool: install it, export FOCUS rows, run it, read it.

focus-validator 2.2.1 needs Python >= 3.12 and its own dependency pins (`numpy<2`, `pyarrow<18`), so it
lives in a separate virtualenv `.venv-focus` at the repo root (`make install` creates it; `ensure_venv`
is the fallback when the tests run without make). It opens `focus_validator/rules/currency_codes.csv`
relative to the working directory, so it runs from the site-packages folder that holds the package.
Its `--output-type unittest` report is JUnit XML; `errors` there are rules that could not run (a column
they need is missing) and count as failures.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-focus"
REQUIREMENTS = ("focus-validator==2.2.1", "numpy<2", "pyarrow<18")
FOCUS_VERSION = "1.2"


@dataclass
class Failure:
    """One rule that failed or could not run."""

    name: str
    kind: str  # "failure" or "error"
    message: str


@dataclass
class Report:
    """Counts of the JUnit report and the rules that did not pass."""

    tests: int
    failures: int
    errors: int
    skipped: int
    problems: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No failed and no errored rule."""
        return self.failures + self.errors == 0

    def summary(self) -> str:
        """Counts plus one line per failed or errored rule."""
        head = f"tests={self.tests} failures={self.failures} errors={self.errors} skipped={self.skipped}"
        return "\n".join([head, *(f"  [{p.kind}] {p.name}: {p.message}" for p in self.problems)])


def find_python312() -> str:
    """The newest pyenv 3.12 interpreter, else `python3.12` on PATH."""
    candidates = glob.glob(os.path.expanduser("~/.pyenv/versions/3.12.*/bin/python3.12"))

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name  # 3.12.N
        return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))

    for path in sorted(candidates, key=version, reverse=True):
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("python3.12")
    if found is None:
        raise RuntimeError("focus-validator needs Python 3.12: none in ~/.pyenv/versions/3.12.* or on PATH")
    return found


def ensure_venv(venv: Path = VENV) -> Path:
    """Create `.venv-focus` with focus-validator unless its marker file says it is installed."""
    marker = venv / ".installed"
    python = venv / "bin" / "python"
    if marker.exists() and python.exists():
        return venv
    if not python.exists():
        subprocess.run([find_python312(), "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    marker.touch()
    return venv


def site_packages(venv: Path = VENV) -> Path:
    """The site-packages folder that contains `focus_validator/`."""
    found = sorted(venv.glob("lib/python3*/site-packages/focus_validator"))
    if not found:
        raise RuntimeError(f"focus_validator is not installed in {venv}")
    return found[-1].parent


# -- export ----------------------------------------------------------------------------------------


def csv_value(value: Any) -> str:
    """FOCUS text form: UTC `YYYY-MM-DDTHH:MM:SSZ`, plain decimals, JSON text, NULL as empty."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        stamp = value.astimezone(UTC) if value.tzinfo else value
        return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        # Full scale ("25.000000000"): trailing zeros kept so that a column of whole numbers is still read
        # as a decimal (the validator infers column types from the CSV and rejects integer-typed Decimals).
        return format(value, "f")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def write_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], path: Path) -> int:
    """Write rows with exactly `columns` as the header; return the row count."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_value(row.get(c)) for c in columns])
            count += 1
    return count


# -- run and read ----------------------------------------------------------------------------------


def parse_report(path: Path) -> Report:
    """Counts from `<testsuites>` (summed from the suites if absent) and the failed/errored cases."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")

    def count(name: str) -> int:
        if root.get(name) is not None:
            return int(root.get(name, "0"))
        return sum(int(s.get(name, "0")) for s in suites)

    problems: list[Failure] = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                message = node.get("message") or (node.text or "").strip()
                name = case.get("name", "?")
                classname = case.get("classname")
                problems.append(Failure(f"{classname}.{name}" if classname else name, kind, message))
    return Report(count("tests"), count("failures"), count("errors"), count("skipped"), problems)


def run_validator(data_file: Path, out_file: Path, *, venv: Path = VENV, timeout: float = 600) -> Report:
    """Run focus-validator on a CSV for FOCUS 1.2 and return its parsed JUnit report."""
    ensure_venv(venv)
    command = [
        str(venv / "bin" / "focus-validator"),
        "--data-file",
        str(data_file.resolve()),
        "--validate-version",
        FOCUS_VERSION,
        "--output-type",
        "unittest",
        "--output-destination",
        str(out_file.resolve()),
    ]
    done = subprocess.run(command, cwd=site_packages(venv), capture_output=True, text=True, timeout=timeout)
    if not out_file.exists():
        raise RuntimeError(
            f"focus-validator wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return parse_report(out_file)


__all__ = ["Failure", "Report", "csv_value", "ensure_venv", "parse_report", "run_validator", "write_csv"]
