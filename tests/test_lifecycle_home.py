"""Statuses change in one place: service/lifecycle.py. Everywhere else reads them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Writing a job's or stage's status: an attribute assignment on a row (not SQL text, not an HTTP
# error's own status), a keyword of an UPDATE or a constructor, or a row dict entry.
ASSIGNMENT = re.compile(
    r"(?<!self)\.status\s*=(?!=)(?!\s*['\"])"
    r"|\bvalues\([^)]*\bstatus\s*="
    r"|\bstatus\s*=\s*(Job|Stage)Status\."
    r"|['\"]status['\"]\s*:\s*(Job|Stage)Status\."
)


def test_no_status_is_assigned_outside_the_lifecycle_module() -> None:
    offenders = []
    for folder in ("service", "worker", "api", "w2s_service"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "lifecycle.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if ASSIGNMENT.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "status changes belong in service/lifecycle.py:\n" + "\n".join(offenders)


STATUS = r"(queued|running|succeeded|failed|cancelled|pending|cached)"
# A comparison with a literal status (``== "running"``, ``in ("succeeded", "cached")``, the same in a
# template): what is terminal, cancellable or done is service/states.py's to say.
COMPARISON = re.compile(rf"""(==|!=)\s*["']{STATUS}["']|\bin\s*[\(\[][^)\]]*["']{STATUS}["']""")


def test_only_the_states_module_names_statuses() -> None:
    offenders = []
    for folder in ("service", "worker", "api", "w2s_service"):
        for path in sorted([*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.html")]):
            if path.name == "states.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if COMPARISON.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "compare statuses through service/states.py:\n" + "\n".join(offenders)
