"""What the HTML pages (report.html, compare.html) share: their style sheet and how figures are embedded."""

from __future__ import annotations

import base64
import io
from typing import Any

DPI = 80  # keeps a full report of a deep model within a few MB

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.finding{border-left:5px solid #999;padding:.4em 1em;margin:1em 0;background:#fafafa}
.finding.error{border-color:#c62828}.finding.warning{border-color:#f9a825}.finding.info{border-color:#1565c0}
.sev{font-weight:bold;text-transform:uppercase;font-size:.85em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
img{max-width:100%;height:auto}
pre{background:#f4f4f4;padding:.5em;overflow-x:auto;font-size:.8em}
.ok{color:#2e7d32;font-weight:bold}
"""


def png_base64(fig: Any) -> str:
    """A matplotlib figure as base64 PNG for an ``<img src="data:...">``; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
