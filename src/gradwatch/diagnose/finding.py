"""The records diagnosis produces: a Finding with its evidence and ranked Remedies (findings.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
