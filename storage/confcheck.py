"""Checks of the storage tiers' string settings, shared by their config classes.

A setting that can never work (a NUL, a lone surrogate, a URL that is not one, a bucket
name the service refuses) fails when the config is built, with a ``ConfigError`` naming
``section.key``, instead of as a raw library exception when the tier opens.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from kvbm.errors import ConfigError

# S3 bucket names: letters, digits, dots, hyphens and underscores, starting and ending with a
# letter or digit, at most 255 characters. That is wider than S3's rules for new buckets
# (3-63 lowercase, no underscores) on purpose: older us-east-1 buckets and S3-compatible
# servers use names outside them, and a name a working server accepts must not be refused
# here. What can never be a bucket name (spaces, slashes, NUL ...) is.
_S3_BUCKET = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9])?")
# GCS: lowercase letters, digits, dashes, underscores and dots; up to 222 characters with
# dots (each dot-separated part at most 63), up to 63 without.
_GCS_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,220}[a-z0-9])?")


def check_text(owner: str, name: str, value: Any, *, optional: bool = False,
               empty: bool = True) -> None:
    """``value`` is a string (or ``None`` with ``optional``) without NUL or lone surrogates
    (neither can reach a file name, an HTTP header or a URL); non-empty unless ``empty``."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "a string or unset" if optional else "a string"
        raise ConfigError(f"{owner}.{name} must be {kind}, got {value!r}")
    if not value and not empty:
        raise ConfigError(f"{owner}.{name} must not be empty")
    if "\0" in value:
        raise ConfigError(f"{owner}.{name} must not contain NUL, got {value!r}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{owner}.{name} has no UTF-8 form (a lone surrogate): "
                          f"{value!r}") from None


def check_path(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty path the file system can be given (``os.fsencode`` accepts it)."""
    if value is None and optional:
        return
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{owner}.{name} must be a non-empty path, got {value!r}")
    text = os.fspath(value)
    if (isinstance(text, str) and "\0" in text) or (isinstance(text, bytes) and b"\0" in text):
        raise ConfigError(f"{owner}.{name} must not contain NUL, got {value!r}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise ConfigError(f"{owner}.{name} has no file-system form (a lone surrogate?): "
                          f"{value!r}") from None


def check_url(owner: str, name: str, value: Any) -> None:
    """An ``http://`` or ``https://`` URL with a host (or unset)."""
    check_text(owner, name, value, optional=True)
    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{owner}.{name} must be an http(s) URL, got {value!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
            c.isspace() for c in value):
        raise ConfigError(f"{owner}.{name} must be an http(s) URL such as "
                          f"'http://127.0.0.1:9000', got {value!r}")


def closest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``; else an error naming the closest."""
    options = list(choices)
    if value in options:
        return
    word = value if isinstance(value, str) else ""
    raise ConfigError(f"{owner}.{name} = {value!r} is not one of {', '.join(options)}"
                      f"{closest(word, options)}")


def check_s3_bucket(value: Any) -> None:
    check_text("s3", "bucket", value, empty=False)
    if value.startswith("arn:"):
        return  # an access point or outpost ARN: the service checks those
    if not _S3_BUCKET.fullmatch(value):
        raise ConfigError(f"s3.bucket must be a bucket name (letters, digits, dots, hyphens "
                          f"and underscores, starting and ending with a letter or digit, at "
                          f"most 255 characters) or an access point ARN, got {value!r}")


def check_gcs_bucket(value: Any) -> None:
    check_text("gcs", "bucket", value, empty=False)
    parts = value.split(".")
    if (not _GCS_BUCKET.fullmatch(value) or any(len(p) > 63 for p in parts)
            or (len(parts) == 1 and len(value) > 63)):
        raise ConfigError(f"gcs.bucket must be a bucket name (lowercase letters, digits, "
                          f"dashes, underscores and dots, starting and ending with a letter "
                          f"or digit; at most 63 characters, 222 with dots), got {value!r}")
