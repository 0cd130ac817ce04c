"""Text written by others (file names of a snapshot, snapshot descriptions, a server's
error messages) made safe to print: nothing it holds may move the cursor, recolour or
retitle a terminal, forge a line, or stop the listing with an encoding error.

Names are quoted the way git quotes paths (core.quotePath=false): a name that needs no
escape is printed as it is; one that does is put in double quotes, with C escapes
(\\t \\n \\" \\\\ ...) and three-digit octal for every other byte that is not safe.
Unsafe: C0 and C1 controls and DEL, bytes that are not UTF-8, Unicode format characters
(bidirectional overrides, zero-width joiners: they make text read other than it is),
line and paragraph separators, and unassigned or private code points. Valid UTF-8 text
in other scripts stays readable, unless `ascii_only` (for an output that is not UTF-8:
then every byte past ASCII is escaped, as core.quotePath=true does). Names are `str`
decoded with surrogateescape (how ebsfs carries raw bytes) or `bytes`."""

from __future__ import annotations

import base64
import re
import unicodedata

__all__ = ["quote", "printable", "raw_bytes", "raw_b64", "utf8_stream"]

_LETTERS = {
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_PLAIN = re.compile(r"[ !#-\[\]-~]*")
"""Printable ASCII but `"` and `\\`: nothing to escape (most names; checked in C)."""


def raw_bytes(text: str | bytes) -> bytes:
    """The bytes a name stands for (str names carry undecodable bytes as
    surrogateescape)."""
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate a library made: keep it, as bytes
        return text.encode("utf-8", "surrogatepass")


def raw_b64(text: str | bytes) -> str:
    """The raw bytes of a name in base64, for JSON: the name exactly, whatever it
    holds."""
    return base64.b64encode(raw_bytes(text)).decode("ascii")


def _escaped(text: str | bytes, quote_marks: bool, ascii_only: bool) -> tuple[str, bool]:
    """The text with every unsafe character escaped, and whether any was."""
    if isinstance(text, str) and _PLAIN.fullmatch(text):
        return text, False
    decoded = raw_bytes(text).decode("utf-8", "surrogateescape")
    out: list[str] = []
    changed = False
    for ch in decoded:
        code = ord(ch)
        if ch in _LETTERS and (quote_marks or ch not in '"\\'):
            out.append(_LETTERS[ch])
            changed = True
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\{code - 0xDC00:03o}")
            changed = True
        elif code < 0x80 and 0x20 <= code < 0x7F:
            out.append(ch)
        elif ascii_only or unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append("".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass")))
            changed = True
        else:
            out.append(ch)
    return "".join(out), changed


def quote(name: str | bytes, ascii_only: bool = False) -> str:
    """A name as git prints a path: as it is if nothing in it needs escaping, else in
    double quotes with C escapes (so a quoted name always starts with `"`)."""
    text, changed = _escaped(name, True, ascii_only)
    return f'"{text}"' if changed else text


def printable(text: str | bytes, ascii_only: bool = False) -> str:
    """A message holding others' text (a server's answer, a library's error) as one
    safe line: unsafe characters escaped as in `quote`, no quotes added, quotation
    marks and backslashes left as they are."""
    return _escaped(text, False, ascii_only)[0]


def utf8_stream(stream: object) -> bool:
    """Whether a text stream writes UTF-8 (else names are printed in ASCII only)."""
    encoding = str(getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf8sig")
