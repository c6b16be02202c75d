"""Whether the Hugging Face hub may be reached, and the one-line errors when it may not.

Nothing in swarmloco goes to the hub unless the run's config names a hub model or dataset; then an
offline machine (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set) gets one
line naming the field instead of a retry loop and a traceback.
"""

from __future__ import annotations

import os

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """True when the environment says the hub must not be contacted."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_ENV)


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (transformers' validation errors span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def offline_error(field: str, value: str, what: str) -> ValueError:
    set_vars = [v for v in OFFLINE_ENV if os.environ.get(v)]
    return ValueError(f"{field}={value!r} is no local path, and as a hub {what} it needs the network: this machine "
                      f"is offline ({', '.join(set_vars) or 'no network'})")
