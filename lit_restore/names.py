"""Names that come from users' files and strangers' shards (a shard's json `dataset`, an input's
file name), made safe to use as a file name or to write as one line of a text file."""

from __future__ import annotations

import hashlib

# Far below every filesystem's 255-byte name limit, with room for a suffix and a prefix.
MAX_NAME = 80


def safe_name(name: str, limit: int = MAX_NAME) -> str:
    """`name` with every character but letters, digits, '-', '_' and '.' made '_', no leading
    dot, and at most `limit` characters: a longer name keeps its start and gets 8 hex digits of
    its hash, so two long names that share a start stay apart."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in name).lstrip(".") or "_"
    if len(safe) <= limit:
        return safe
    return f"{safe[:limit - 9]}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def one_line(text: str) -> str:
    """`text` with newlines and other control characters written as escapes (`\\n`), so a file
    name holding one cannot split a line of skipped.txt or failed.txt."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)
