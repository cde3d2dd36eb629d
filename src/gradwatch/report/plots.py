"""The pictures: drawn from a stored run with matplotlib (Agg), never from a model.

Each function takes a :class:`~gradwatch.store.Run` and returns a matplotlib Figure. Deep models stay
readable: line plots show at most ``MAX_LINES`` layers (first, last, and evenly spaced between),
heatmaps show every layer as a row.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..diagnose.facts import streams as flow_streams
from ..errors import GradwatchError
from ..store import Run

MAX_LINES = 8  # more than this many lines in one panel is a legend nobody reads
MAX_COLUMNS = 800  # heatmap columns: long runs are binned down to this many


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise GradwatchError("plots need matplotlib, which gradwatch depends on; "
                             "reinstall it with `pip install matplotlib`.") from None
    return plt


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def weight_layer_ids(run: Run) -> list[int]:
    """Weight matrices and kernels in the order they ran, input side first (what the seeds plot per
    layer): the layers the diagnosis reads the gradient flow from, or every layer if there are none."""
    return [i for ids in flow_streams(run) for i in ids] or list(range(len(run.layers)))


def pick_lines(ids: list[int], k: int = MAX_LINES) -> list[int]:
    """At most ``k`` of ``ids``: the first, the last, and evenly spaced between."""
    if len(ids) <= k:
        return ids
    idx = np.unique(np.linspace(0, len(ids) - 1, k).round().astype(int))
    return [ids[i] for i in idx]


def _bin_columns(values: np.ndarray, steps: np.ndarray, limit: int = MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Median-bin the step axis of (steps, layers) down to ``limit`` columns."""
    if len(steps) <= limit:
        return values, steps
    edges = np.linspace(0, len(steps), limit + 1).astype(int)
    binned = np.stack([_nanmedian(values[a:b], axis=0) for a, b in zip(edges[:-1], edges[1:])])
    return binned, steps[edges[:-1]]


def nonfinite_steps(run: Run) -> np.ndarray:
    """Steps with a non-finite gradient or logged loss — not counting the overflows GradScaler
    caught and skipped (AMP calibrating its loss scale)."""
    flags = np.nan_to_num(run.layer_series("grad_nonfinite"), nan=0.0) > 0
    flags &= ~(np.nan_to_num(run.step_series("amp_skipped"), nan=0.0) > 0)[:, None]
    loss = run.step_series("loss")
    logged = run.step_series("loss_logged") > 0
    return run.steps[flags.any(axis=1) | (~np.isfinite(loss) & logged)]


def amp_text(run: Run) -> str | None:
    """``loss scale 65536 -> 16384, 2 steps skipped by GradScaler (at 3, 7)``; None without a GradScaler."""
    scale = run.step_series("amp_scale").astype(np.float64)
    seen = np.isfinite(scale)
    if not seen.any():
        return None
    skipped = flagged_steps(run, "amp_skipped")
    first, last = scale[seen][0], scale[seen][-1]
    text = f"loss scale {first:.6g} -> {last:.6g}, {skipped.size} step{'s' * (skipped.size != 1)} skipped by GradScaler"
    if skipped.size:
        shown = ", ".join(str(int(s)) for s in skipped[:8]) + (", ..." if skipped.size > 8 else "")
        text += f" (at {shown}; overflows it caught: not findings)"
    return text


def gradient_flow_heatmap(run: Run) -> Any:
    """Layer x step heatmap of log10 gradient RMS: vanishing is a dark band on the input side,
    an explosion a bright column; non-finite steps are marked in red along the top."""
    plt = _plt()
    rms = run.layer_series("grad_rms").astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(np.isfinite(rms) & (rms > 0), np.log10(rms), np.nan)
    values, steps = _bin_columns(logv, run.steps)
    n_layers = len(run.layers)
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.18 * n_layers + 1.5))))
    if values.size and np.isfinite(values).any():
        im = ax.imshow(values.T, aspect="auto", interpolation="nearest", cmap="magma",
                       extent=(steps[0], steps[-1] + 1, n_layers - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="log10 gradient RMS")
    elif len(run.steps):
        # Nothing to colour: say why instead of drawing an empty frame.
        zero = np.isfinite(rms) & (rms == 0)
        why = ("every recorded gradient is exactly zero" if zero.any() and not (np.isfinite(rms) & (rms > 0)).any()
               else "no finite gradient was recorded")
        ax.set_xlim(float(run.steps[0]), float(run.steps[-1]) + 1)
        ax.set_ylim(n_layers - 0.5, -0.5)
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=11)
    bad = nonfinite_steps(run)
    if bad.size:
        ax.plot(bad, np.full(bad.shape, -0.5), "v", color="red", markersize=6, clip_on=False, label="non-finite")
        ax.legend(loc="upper right", fontsize=8)
    ticks = list(range(n_layers)) if n_layers <= 40 else list(np.linspace(0, n_layers - 1, 20).round().astype(int))
    ax.set_yticks(ticks)
    ax.set_yticklabels([run.layers[i].name for i in ticks], fontsize=7 if n_layers > 12 else 8)
    ax.set_xlabel("optimizer step")
    ax.set_title("gradient flow: log10 RMS of each layer's gradient (input side at the top)")
    fig.tight_layout()
    return fig


def _layer_lines(ax: Any, run: Run, metric: str, ids: list[int], log: bool = False, absolute: bool = False) -> None:
    values = run.layer_series(metric)
    for i in ids:
        y = values[:, i].astype(np.float64)
        mask = np.isfinite(y)
        if absolute:
            y = np.abs(y)
        if log:
            mask &= y > 0
        if mask.any():
            few = int(mask.sum()) < 30  # sampled metrics on short runs: show the points themselves
            ax.plot(run.steps[mask], y[mask], label=run.layers[i].name, linewidth=1, marker="." if few else None)
    if log:
        ax.set_yscale("log")
    if ids:
        ax.legend(fontsize=7, ncol=2 if len(ids) > 4 else 1)


def gradient_plots(run: Run) -> Any:
    """Seed 004's ``plot_gradient`` for any model: mean gradient, gradient std (log) and loss."""
    plt = _plt()
    ids = pick_lines(weight_layer_ids(run))
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    _layer_lines(axes[0], run, "grad_mean", ids)
    axes[0].set_title("mean gradient per layer")
    _layer_lines(axes[1], run, "grad_std", ids, log=True)
    axes[1].set_title("gradient std per layer (log scale)")
    loss = run.step_series("loss")
    mask = np.isfinite(loss)
    axes[2].plot(run.steps[mask], loss[mask], color="black", linewidth=1)
    finite = loss[mask]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3:
        axes[2].set_yscale("log")  # a loss that spans decades (an explosion) is read on a log axis
    axes[2].set_title("loss")
    axes[2].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def weight_plots(run: Run) -> Any:
    """Seed 004's ``plotweight`` for any model: weight mean and std per layer."""
    plt = _plt()
    ids = pick_lines(weight_layer_ids(run))
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    _layer_lines(axes[0], run, "weight_mean", ids)
    axes[0].set_title("mean weight per layer")
    _layer_lines(axes[1], run, "weight_std", ids, log=True)
    axes[1].set_title("weight std per layer (log scale)")
    axes[1].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def flagged_steps(run: Run, name: str) -> np.ndarray:
    """The steps where the flag series ``name`` (``"skipped"``, ``"rolled_back"``) is set."""
    return run.steps[np.nan_to_num(run.step_series(name), nan=0.0) > 0]


def has_guards(run: Run) -> bool:
    """Whether the run recorded what guards did: a post-guard norm, or a skipped or rolled-back step."""
    return bool(np.isfinite(run.step_series("grad_norm_clipped")).any()
                or flagged_steps(run, "skipped").size or flagged_steps(run, "rolled_back").size)


def guard_counts(run: Run) -> dict[str, int]:
    """Steps the guards clipped (``clip_coef`` < 0.999), skipped (no-op optimizer step) and rolled back."""
    coef = run.step_series("clip_coef")
    with np.errstate(invalid="ignore"):
        clipped = int(np.sum(np.isfinite(coef) & (coef < 0.999)))
    return {"clipped": clipped, "skipped": len(flagged_steps(run, "skipped")),
            "rolled_back": len(flagged_steps(run, "rolled_back"))}


def _guard_lines(ax: Any, run: Run) -> list[str]:
    """The post-guard norm, the clip threshold (dashed), skipped steps (red x along the top) and
    rollbacks (vertical lines); returns the title's notes."""
    skipped = flagged_steps(run, "skipped")
    after = run.step_series("grad_norm_clipped").astype(np.float64)
    stepped = np.nan_to_num(run.step_series("skipped"), nan=0.0) == 0  # a skipped step used no gradient
    mask = np.isfinite(after) & (after > 0) & stepped
    # NaN where not drawn: the line breaks at skipped steps rather than bridging them.
    ax.plot(run.steps, np.where(mask, after, np.nan), linewidth=1.8, color="C1", zorder=2.2,
            label="after guards: the norm the optimizer stepped with")
    thr = run.step_series("clip_threshold").astype(np.float64)
    tmask = np.isfinite(thr) & (thr > 0)
    if tmask.any():  # drawn over the post-guard norm, which often lies on it: orange shows between the dashes
        ax.plot(run.steps, np.where(tmask, thr, np.nan), linestyle=(0, (4, 3)), linewidth=1, color="black",
                zorder=2.4, label="clip threshold")
    notes = []
    counts = guard_counts(run)
    if counts["clipped"]:
        notes.append(f"{counts['clipped']} clipped")
    if skipped.size:
        ax.plot(skipped, np.full(skipped.shape, 0.97), "x", color="red", markersize=6, clip_on=False,
                transform=ax.get_xaxis_transform(), label="skipped step (no update)")
        notes.append(f"{skipped.size} skipped")
    rolled = flagged_steps(run, "rolled_back")
    for i, s in enumerate(rolled[:200]):
        ax.axvline(s, color="purple", linestyle="-.", linewidth=1.2,
                   label="rollback (snapshot restored)" if i == 0 else "_rollback")
    if rolled.size:
        notes.append(f"{rolled.size} rolled back")
    return notes


def norm_plot(run: Run) -> Any:
    """The global gradient norm (log) with non-finite steps marked.

    With guards it shows the norm before them (what backward computed) and after them (what the
    optimizer used), the clip threshold, skipped steps and rollbacks.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    guarded = has_guards(run)
    g = run.step_series("grad_norm").astype(np.float64)
    mask = np.isfinite(g) & (g > 0)
    if guarded:
        ax.plot(run.steps, np.where(mask, g, np.nan), linewidth=1, color="C0",
                label="before guards: the norm backward() computed")
    else:
        ax.plot(run.steps[mask], g[mask], linewidth=1, label="global gradient norm (before any clipping)")
    notes = _guard_lines(ax, run) if guarded else []
    amp_skipped = flagged_steps(run, "amp_skipped")
    if amp_skipped.size:
        ax.plot(amp_skipped, np.full(amp_skipped.shape, 0.03), "|", color="gray", markersize=9, clip_on=False,
                transform=ax.get_xaxis_transform(), label="skipped by GradScaler (AMP overflow)")
        notes.append(f"{amp_skipped.size} skipped by AMP")
    bad = nonfinite_steps(run)
    for s in bad[:200]:
        ax.axvline(s, color="red", alpha=0.3, linewidth=1)
    if bad.size:
        notes.insert(0, f"red: {len(bad)} non-finite steps")
    drawn = ("grad_norm", "grad_norm_clipped", "clip_threshold") if guarded else ("grad_norm",)
    if any(np.any(np.isfinite(v) & (v > 0)) for v in map(run.step_series, drawn)):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    ax.set_title("global gradient norm" + (" before and after guards" if guarded else "")
                 + (f" — {', '.join(notes)}" if notes else ""))
    fig.tight_layout()
    return fig


def update_ratio_plot(run: Run) -> Any:
    """Update ratio |dw|/|w| per layer on sampled steps, against the 1e-3 rule of thumb."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    _layer_lines(ax, run, "update_ratio", pick_lines(weight_layer_ids(run)), log=True)
    ax.axhline(1e-3, color="gray", linestyle="--", linewidth=1)
    ax.text(run.steps[0] if len(run.steps) else 0, 1e-3, " 1e-3 rule of thumb", va="bottom", fontsize=8, color="gray")
    ax.set_title("update ratio |Δw| / |w| per layer (sampled steps)")
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def activation_plot(run: Run) -> Any | None:
    """Dead-unit and saturation fractions per layer on sampled steps (None if never computed)."""
    dead, sat = run.layer_series("act_dead_frac"), run.layer_series("act_sat_frac")
    if not (np.isfinite(dead).any() or np.isfinite(sat).any()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, values, title in ((axes[0], dead, "dead units (never positive in the batch)"),
                              (axes[1], sat, "saturated pre-activations (sigmoid/tanh)")):
        ids = pick_lines([i for i in range(values.shape[1]) if np.isfinite(values[:, i]).any()])
        for i in ids:
            mask = np.isfinite(values[:, i])
            ax.plot(run.steps[mask], values[mask, i], marker=".", linewidth=1, label=run.layers[i].name)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        if ids:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
