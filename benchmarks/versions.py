#!/usr/bin/env python
"""Is gradwatch's step overhead worse than it was at an earlier commit?

Runs ``benchmarks/overhead.py`` (this tree's, so both versions meet the same harness) with only
the unmonitored and gradwatch methods, once per version per round, alternating which version goes
first. Each version is a source tree: an earlier commit checked out in a temporary ``git
worktree``, and this working tree (or a second commit). Every run asserts it imported the version
it was meant to.

The figure per model and version is gradwatch's step time over the unmonitored step time, both
from the same process (median window of each), then the median over rounds: the ratio cancels
most of the machine's drift between runs, which absolute times would not.

    .venv/bin/python benchmarks/versions.py --before b04ff64~1            # ~10 min on 2 cores
    .venv/bin/python benchmarks/versions.py --before b04ff64~1 --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERHEAD = REPO / "benchmarks" / "overhead.py"

#: Runs overhead.py as __main__ after checking which gradwatch is imported.
_LAUNCH = (
    "import runpy, sys; import gradwatch; sys.argv = sys.argv[1:]; root = sys.argv.pop(1); "
    "assert gradwatch.__file__.startswith(root), f'imported {gradwatch.__file__}, not the tree under {root}'; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` at ``where`` (detached); its ``src``."""
    git("worktree", "add", "--detach", "--force", str(where), rev)
    return where / "src"


def run_once(src: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """gradwatch/unmonitored step-time ratio per model, from one overhead.py process."""
    cmd = [sys.executable, "-c", _LAUNCH, str(OVERHEAD), str(src), "--methods", "unmonitored,gradwatch",
           "--models", args.models, "--json", str(out)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"overhead.py failed for {src}:\n{proc.stderr[-3000:]}")
    results = json.loads(out.read_text())["results"]
    by = {(r["model"], r["method"]): statistics.median(r["window_ms"]) for r in results if r["window_ms"]}
    return {m: by[(m, "gradwatch")] / by[(m, "unmonitored")]
            for m in {m for m, _ in by} if (m, "gradwatch") in by and (m, "unmonitored") in by}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (e.g. b04ff64~1)")
    p.add_argument("--after", default=None, help="the later commit (default: this working tree)")
    p.add_argument("--rounds", type=int, default=3, help="runs per version (default 3)")
    p.add_argument("--models", default="mlp,cnn,transformer", help="overhead.py's --models (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: numbers meaningless")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    with tempfile.TemporaryDirectory(prefix="gradwatch-versions-") as tmp:
        tmpdir = Path(tmp)
        trees: list[tuple[str, Path]] = []
        try:
            before_rev = git("rev-parse", "--short", args.before)
            trees.append((f"before ({before_rev})", checkout(args.before, tmpdir / "before")))
            if args.after is None:
                trees.append(("after (working tree)", REPO / "src"))
            else:
                after_rev = git("rev-parse", "--short", args.after)
                trees.append((f"after ({after_rev})", checkout(args.after, tmpdir / "after")))
            ratios: dict[str, dict[str, list[float]]] = {name: {} for name, _ in trees}
            for r in range(args.rounds):
                order = trees if r % 2 == 0 else trees[::-1]
                for name, src in order:
                    print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    for model, ratio in run_once(src, args, tmpdir / f"{r}-{len(ratios[name])}.json").items():
                        ratios[name].setdefault(model, []).append(ratio)
        finally:
            for path in ("before", "after"):
                if (tmpdir / path).exists():
                    git("worktree", "remove", "--force", str(tmpdir / path))

    (b_name, _), (a_name, _) = trees
    models = sorted(set(ratios[b_name]) & set(ratios[a_name]))
    print(f"- command: {' '.join(sys.orig_argv)}")
    print(f"- step time with gradwatch / without, median over {args.rounds} rounds (each round: one overhead.py "
          "process per version, order alternating)")
    print()
    print(f"| model | {b_name} | {a_name} | after / before |")
    print("|---|---|---|---|")
    for m in models:
        b, a = statistics.median(ratios[b_name][m]), statistics.median(ratios[a_name][m])
        spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
        print(f"| {m} | {b:.3f}x ({spread(ratios[b_name][m])}) | {a:.3f}x ({spread(ratios[a_name][m])}) | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
