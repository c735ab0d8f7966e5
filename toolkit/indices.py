"""The index-list grammar every option that names layers, steps, chunks or heads shares: ``"7"``, inclusive
ranges ``"3-5"``, comma lists of both. It lives in the base layer so the capture selection, the analyses' flags
and the attention rules (``--attention ...@layers=0-3``) read one grammar."""

from __future__ import annotations


def index_range(part: str) -> range:
    """One item of an index list: ``"7"`` or an inclusive range ``"3-5"``; ``ValueError`` otherwise."""
    part = part.strip()
    if "-" in part[1:]:
        a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
        lo, hi = int(a), int(b)
        if hi < lo:
            raise ValueError(part)
        return range(lo, hi + 1)
    return range(int(part), int(part) + 1)
