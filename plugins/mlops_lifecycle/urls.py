"""URLs that are shown to people (links, changelogs, merge requests, logs) never carry credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``scheme://user:password@host/...`` -> (the URL without ``user:password@``, user, password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if "@" not in parts.netloc:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)), parts.username, parts.password


def without_userinfo(url: str) -> str:
    """``url`` as it may be shown: any ``user:password@`` removed."""
    return split_userinfo(url)[0]
