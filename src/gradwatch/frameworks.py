"""Which training frameworks this Python can import, asked without importing gradwatch's framework side.

The core (store, diagnosis, report, the CLI for stored runs) never needs one; recording does.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def torch_error() -> str | None:
    """Why ``import torch`` fails here (``"ModuleNotFoundError: No module named 'torch'"``), or None."""
    try:
        import torch  # noqa: F401
    except Exception as e:  # not installed, or an installation that fails to import
        return f"{type(e).__name__}: {e}"
    return None
