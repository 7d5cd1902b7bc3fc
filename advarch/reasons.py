"""One short line saying why something failed, from an exception of any library."""

from __future__ import annotations

LIMIT = 160  # characters: a reason sits inside one error line that names the file or key


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def short_reason(err: BaseException) -> str:
    """The first line of `err`'s message (its type when empty), cut to its first sentence
    when that is long, and at a word (with '…') when even that is over `LIMIT`."""
    line = first_line(err)
    if len(line) <= LIMIT:
        return line
    sentence = line.find(". ")
    if 0 < sentence < LIMIT:
        return line[: sentence + 1]
    return line[:LIMIT].rsplit(" ", 1)[0] + "…"
