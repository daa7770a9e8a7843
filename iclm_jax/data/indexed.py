"""Records of a large file read on demand, so that memory does not grow with the file.

One pass over the file validates every record and keeps only its byte range (16 bytes) and a label for
messages (its line, or its index); ``IndexedRecords[i]`` re-reads those bytes and parses them again. Item
access is random (grain shuffles by index), the sequence pickles without its file handle (grain worker
processes reopen the file), and a file changed after indexing is refused by name rather than misread.

``json_array_elements`` is the pass for a file holding one JSON array (the ACRE release format): an
incremental scan that decodes one element at a time with the standard library's ``raw_decode`` over a
bounded window, yielding each element's byte range, first line and value.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from iclm_jax.data.lazy import LazySequence

CHUNK = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")   # JSON's whitespace
_AFTER_SCALAR = " \t\n\r,]"


class ChangedFile(ValueError):
    """The file was modified after it was indexed."""


class IndexedRecords(LazySequence):
    """``parse(raw_bytes, label)`` of each indexed byte range ``[starts[i], ends[i])`` of ``path``.

    ``parse`` must be picklable (a module-level function, or a ``functools.partial`` of one) for grain's
    worker processes. ``labels[i]`` is passed to it for messages (a line number or a record index).
    """

    def __init__(self, path: str, starts, ends, labels, parse: Callable):
        self.path = os.fspath(path)
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.labels = np.asarray(labels, np.int64)
        self.parse = parse
        st = os.stat(self.path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.starts)

    def item(self, i: int):
        # pread: no shared file position, so grain's reader threads can read records at once
        start = int(self.starts[i])
        raw = os.pread(self._open().fileno(), int(self.ends[i]) - start, start)
        return self.parse(raw, int(self.labels[i]))

    def _open(self):
        if self._file is None or self._pid != os.getpid():
            st = os.stat(self.path)
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                raise ChangedFile(f"{self.path}: changed since it was read at the start of the run; "
                                  "restore it or start a new run")
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"IndexedRecords({self.path!r}, {len(self)} records)"


def jsonl_lines(path: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(start, end, line number, raw bytes) of each non-blank line of ``path``, read line by line."""
    pos = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            start, pos = pos, pos + len(raw)
            if raw.strip():
                yield start, pos, n, raw


class ArrayFormatError(ValueError):
    """Not a JSON array of values; ``line`` and ``column`` locate the problem (1-based)."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


def json_array_elements(path: str, chunk: int = CHUNK) -> Iterator[tuple[int, int, int, object]]:
    """(start byte, end byte, first line, value) of each element of the JSON array in ``path``, decoding
    one element at a time: memory holds one element plus a read window, whatever the file's size.
    Raises ``ArrayFormatError`` (line, column) for anything but one array of JSON values, and
    ``UnicodeDecodeError`` for bytes that are not UTF-8. (A malformed element is reported once the rest
    of the file has been read: the scan cannot tell it from an element longer than its window before.)"""
    with open(path, "rb") as f:
        yield from _Scanner(f, chunk).elements()


class _Scanner:
    """A read window ``text[pos:]`` over the file; ``byte``/``line``/``col`` locate ``text[pos]``."""

    def __init__(self, f, chunk: int):
        self.f, self.chunk, self.want = f, chunk, chunk
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.text, self.pos, self.eof = "", 0, False
        self.byte, self.line, self.col = 0, 1, 1

    def more(self) -> bool:
        """Read the next chunk into the window (dropping what was consumed); False at the end."""
        if self.eof:
            return False
        raw = self.f.read(self.want)
        self.eof = not raw
        self.text = self.text[self.pos:] + self.utf8.decode(raw, final=self.eof)
        self.pos = 0
        return True

    def advance(self, end: int) -> None:
        """Consume ``text[pos:end]``."""
        head = self.text[self.pos:end]
        self.byte += len(head.encode("utf-8"))
        nl = head.count("\n")
        self.line += nl
        self.col = len(head) - head.rfind("\n") if nl else self.col + len(head)
        self.pos = end

    def peek(self) -> str:
        """The next non-space character ('' at the end), consuming the space before it."""
        while True:
            self.advance(_SPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]

    def fail(self, message: str, at: int | None = None):
        at = self.pos if at is None else at
        before = self.text[self.pos:at]
        nl = before.count("\n")
        col = len(before) - before.rfind("\n") if nl else self.col + len(before)
        raise ArrayFormatError(message, self.line + nl, col)

    def value(self):
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
                if not self.eof and (end == len(self.text) or (
                        self.text[self.pos] not in '[{"' and self.text[end] not in _AFTER_SCALAR)):
                    # a number cut by the window ("-1.5e" of "-1.5e3" decodes as -1.5): read on
                    raise json.JSONDecodeError("a number or literal may continue", self.text, end)
                self.want = self.chunk
                return value, end
            except json.JSONDecodeError as e:
                if not self.more():     # at the end: a real error (e.pos counts from the window's start)
                    self.fail(f"malformed JSON: {e.msg}", e.pos)
                self.want = min(self.want * 2, 1 << 30)    # an element longer than the window: widen it
            except RecursionError:
                self.fail("JSON nested too deeply")

    def elements(self):
        c = self.peek()
        if c != "[":
            self.fail("top level must be a JSON array" if c else "file is empty")
        self.advance(self.pos + 1)
        first = True
        while True:
            c = self.peek()
            if c == "]":
                self.advance(self.pos + 1)
                break
            if not first:
                if c != ",":
                    self.fail("expected ',' or ']' after an array element" if c else "unterminated array")
                self.advance(self.pos + 1)
                if not self.peek():
                    self.fail("unterminated array")
            elif not c:
                self.fail("unterminated array")
            start, line = self.byte, self.line
            value, end = self.value()
            self.advance(end)
            yield start, self.byte, line, value
            first = False
        if self.peek():
            self.fail("unexpected data after the array")


def read_json_file(path: str, error: Callable[[str, None, str], Exception]) -> object:
    """The JSON value of a whole file; an unreadable, empty or malformed file raises
    ``error(path, None, message)`` (the task's format error: one line naming the file and the place)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise error(path, None, f"cannot read: {e}") from None
    if not text.strip():
        raise error(path, None, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(path, None, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
