"""Findings: what the diagnosis says about a run (:class:`Finding`, its :class:`Remedy` list) and
``findings.json``, the file that holds them in the run directory.

Below the store (``Run.findings`` reads the file) and the diagnosis (which makes them).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunDirError
from .files import FINDINGS_FILE, FORMAT_VERSION, write_json_atomic

KINDS = (
    "vanishing_gradients",
    "exploding_gradients",
    "nonfinite",
    "dead_units",
    "saturated_units",
    "loss_spike",
    "stalled_training",
)
SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Remedy:
    """A fix that guards or surgery can apply: ``action`` + ``args``, and ``why`` tied to the evidence."""

    action: str
    args: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def call(self) -> str:
        """The remedy as a call: ``clip_norm(max_norm=1.0)``."""
        return f"{self.action}({', '.join(f'{k}={v}' for k, v in self.args.items())})"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "args": dict(self.args), "why": self.why}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Remedy":
        return cls(action=str(d["action"]), args=dict(d.get("args", {})), why=str(d.get("why", "")))


@dataclass(frozen=True)
class Finding:
    """One problem in a run: what, where (layers), when (steps), how sure, and what to do."""

    kind: str
    severity: str
    first_step: int
    last_step: int
    layers: list[str]
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: list[Remedy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; known: {', '.join(SEVERITIES)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "first_step": int(self.first_step),
            "last_step": int(self.last_step),
            "layers": list(self.layers),
            "summary": self.summary,
            "evidence": _jsonable(self.evidence),
            "remedies": [r.to_json() for r in self.remedies],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Finding":
        return cls(
            kind=str(d["kind"]),
            severity=str(d["severity"]),
            first_step=int(d["first_step"]),
            last_step=int(d["last_step"]),
            layers=[str(x) for x in d.get("layers", [])],
            summary=str(d.get("summary", "")),
            evidence=dict(d.get("evidence", {})),
            remedies=[Remedy.from_json(r) for r in d.get("remedies", [])],
        )


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to strings ("nan", "inf")."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "findings": [f.to_json() for f in findings]}


def write_findings(path: str | os.PathLike[str], findings: list[Finding]) -> Path:
    """Write ``findings.json`` into a run directory (atomically)."""
    target = Path(path) / FINDINGS_FILE
    write_json_atomic(target, findings_json(findings))
    return target


def read_findings(path: str | os.PathLike[str]) -> list[Finding]:
    target = Path(path) / FINDINGS_FILE
    try:
        data = json.loads(target.read_text())
        return [Finding.from_json(d) for d in data.get("findings", [])]
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise RunDirError(f"{target} is not a valid findings file ({e.__class__.__name__}); "
                          "run `gradwatch diagnose` again.") from None
