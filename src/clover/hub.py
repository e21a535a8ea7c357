"""Whether the Hugging Face hub can be reached, answered in seconds.

The hub clients retry for about half a minute before they give up; a machine that is offline should hear so at
once, with the local alternative named, instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}


def unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used now (an offline switch is set, or its host does not answer), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var} is set"
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or type(error).__name__})"
    return None
