"""The seed scenarios reproduce their seed's qualitative result (who fails, who succeeds)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gradwatch as gw
from gradwatch.scenarios.base import check, run_scenario
from gradwatch.scenarios.seeds import SCENARIOS


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_reproduces_the_seed(tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    results = run_scenario(scenario, tmp_path)
    checks = check(scenario, results)
    assert checks, "every scenario states what it reproduces"
    failed = [text for text, ok in checks if not ok]
    assert not failed, f"seed {scenario.seed_article} not reproduced: {failed}; " + "; ".join(
        f"{r.label}: {r.score:.3g} {r.findings}" for r in results)
    assert (tmp_path / "compare.html").stat().st_size > 10_000
    for r in results:
        assert gw.load_run(r.out).status == "finished"
        assert (Path(r.out) / "report.html").exists() == scenario.reports
