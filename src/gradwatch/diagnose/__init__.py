"""Diagnosis: a stored run in, Findings out. Pure functions over the series; never imports torch.

    findings = gradwatch.diagnose(gradwatch.load_run("runs/exp1"))
"""

from __future__ import annotations

import os

from ..findings import KINDS, SEVERITIES, Finding, Remedy, findings_json, read_findings, write_findings
from ..store import Run, load_run
from .amp import WithoutAmpSkips, amp_skipped, amp_stuck
from .guarded import account_for_guards
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


__all__ = ["KINDS", "SEVERITIES", "Finding", "Remedy", "diagnose", "findings_json", "read_findings", "write_findings", "Run"]
