"""Diagnosis: a stored run in, Findings out. Pure functions over the series; never imports torch.

    findings = gradwatch.diagnose(gradwatch.load_run("runs/exp1"))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..store import FINDINGS_FILE, FORMAT_VERSION, Run, _write_json_atomic, load_run
from .amp import WithoutAmpSkips, amp_skipped, amp_stuck
from .guarded import account_for_guards
from .finding import KINDS, SEVERITIES, Finding, Remedy
from .rules import RULES, RunLike, run_rules

_SEVERITY_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def diagnose(run: RunLike | str | os.PathLike[str]) -> list[Finding]:
    """All findings of a run, most severe first (then earliest).

    Args:
        run: a :class:`~gradwatch.store.Run` (or anything with its series methods), or a run directory.
    """
    if isinstance(run, (str, os.PathLike)):
        run = load_run(run)
    skipped_by_amp = amp_skipped(run)
    seen = WithoutAmpSkips(run, skipped_by_amp) if skipped_by_amp.any() else run
    findings = account_for_guards(seen, run_rules(seen, RULES))
    stuck = amp_stuck(run, skipped_by_amp) if skipped_by_amp.any() else None
    if stuck is not None and not any(f.kind == "nonfinite" for f in findings):
        findings.append(stuck)
    return sorted(findings, key=lambda f: (-_SEVERITY_ORDER[f.severity], f.first_step, KINDS.index(f.kind)))


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "findings": [f.to_json() for f in findings]}


def write_findings(path: str | os.PathLike[str], findings: list[Finding]) -> Path:
    """Write ``findings.json`` into a run directory (atomically)."""
    target = Path(path) / FINDINGS_FILE
    _write_json_atomic(target, findings_json(findings))
    return target


def read_findings(path: str | os.PathLike[str]) -> list[Finding]:
    target = Path(path) / FINDINGS_FILE
    try:
        data = json.loads(target.read_text())
        return [Finding.from_json(d) for d in data.get("findings", [])]
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise RunDirError(f"{target} is not a valid findings file ({e.__class__.__name__}); run `gradwatch diagnose` again.") from None


__all__ = ["KINDS", "SEVERITIES", "Finding", "Remedy", "diagnose", "findings_json", "read_findings", "write_findings", "Run"]
