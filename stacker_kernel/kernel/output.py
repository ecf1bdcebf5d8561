"""Step output on its way to the notebook: collected from a worker thread, sent in batches.

The engine calls `OutputSink.write` from the thread that runs the step; the
kernel's event loop calls `take` every few tens of milliseconds and publishes
what it got as one `stream` message. Batching by time (not by line) keeps
`echo -n` progress visible and stays far below jupyter_server's iopub rate
limits (`iopub_msg_rate_limit`); the cap keeps a runaway build log from
flooding the browser, with the full log kept by the engine.
"""
from __future__ import annotations

import codecs
import threading

DEFAULT_CAP = 1 << 20  # bytes of text streamed into one cell before it is capped


class OutputSink:
    """Thread-safe buffer of one cell's output, decoded, with CRLF folded and a size cap.

    `write` accepts `bytes` (decoded as UTF-8, invalid bytes replaced, split
    characters kept for the next chunk) or `str`. A pty turns every `\\n` into
    `\\r\\n`; the pair becomes `\\n` while a lone `\\r` (progress bars) is kept.
    """

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending_cr = False
        self._cap = cap
        self.sent = 0  # characters accepted so far (not counting the cap notice)
        self.capped = False
        self.received = False  # anything written at all, even past the cap

    def write(self, chunk: bytes | str) -> None:
        """Add a chunk of output; safe to call from any thread."""
        text = self._decoder.decode(chunk) if isinstance(chunk, (bytes, bytearray)) else chunk
        if not text:
            return
        with self._lock:
            self.received = True
            if self._pending_cr:
                text = "\r" + text
                self._pending_cr = False
            if text.endswith("\r"):
                # Might be the first half of a CRLF split across chunks.
                text, self._pending_cr = text[:-1], True
            text = text.replace("\r\n", "\n")
            if self.capped or not text:
                return
            room = self._cap - self.sent
            if len(text) > room:
                text = text[:room] + (
                    f"\n[stacker-kernel: output capped at {self._cap // 1024} KiB;"
                    " the rest goes to the step's log]\n")
                self.capped = True
            self.sent += len(text)
            self._parts.append(text)

    def take(self, final: bool = False) -> str:
        """Everything written since the last call; with `final`, also a held-back `\\r`."""
        with self._lock:
            if final and self._pending_cr:
                self._parts.append("\r")
                self._pending_cr = False
            text = "".join(self._parts)
            self._parts.clear()
            return text
