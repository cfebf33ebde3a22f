"""Credentials out of anything that is logged or stored: user:password@ in a URI, tokens in its query string.

A tracking URI such as http://alice:s3cret@mlflow.site:5000 or an artifact URL with ?sig=... would otherwise
end up in MLflow params, W&B configs, checkpoints, registered models and console logs.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://userinfo@ : up to the last @ of the authority (a raw password may hold one)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]+)@")
# query or fragment parameters whose name says they hold a secret (token, key, sig, X-Amz-Signature, ...)
_SECRET_PARAM = re.compile(
    r"(?P<lead>[?&#;])(?P<name>[^=&#\s]*(?:token|key|secret|passw|pwd|sig|credential|auth|session)[^=&#\s]*)"
    r"=(?P<value>[^&#\s]*)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """The text with every URI's credentials replaced by ***; text without credentials comes back unchanged."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}", text)


def redact(obj: Any) -> Any:
    """redact_text over every string in nested dicts, lists and tuples (keys included)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
