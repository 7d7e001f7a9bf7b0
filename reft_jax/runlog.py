"""The run's log: `<run_dir>/log.txt`, everything a training command printed (appended run
after run), and the full error a one-line message leaves out (`describe_error`)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import jax

LOG_NAME = "log.txt"


def _shown(line: str) -> str:
    """What a terminal last showed of a line rewritten with carriage returns (a progress bar):
    its last non-blank version."""
    if "\r" not in line:
        return line
    return next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")


def describe_error(err: BaseException) -> str:
    """An exception's traceback with its whole chain, including a context its one-line message
    hides (`raise ... from None`)."""
    text = "".join(traceback.format_exception(err))
    hidden = err.__context__ if err.__suppress_context__ else None
    if hidden is not None:
        text = "".join(traceback.format_exception(hidden)) + "\n(which led to)\n\n" + text
    return text


class _Tee:
    """A text stream that writes through to `stream` and hands each line to the run log."""

    def __init__(self, stream: Any, log: RunLog):
        self.stream, self.log, self.line = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        self.log._take(self, text)
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


class RunLog:
    """Appends what a command prints (`sys.stdout` and `sys.stderr`, and logging handlers that
    write to them) to `run_dir/log.txt`, from the moment the run directory exists; what was
    printed before that is written first, after a header line. Each line is written once it is
    complete, a progress bar's carriage-return updates at their last state. `detail(text)`
    writes to the log only (the traceback a one-line error leaves out); an exception leaving the
    `with` block is written there too. Processes other than 0 write `log.<process>.txt`.

    Python-level only: what native code writes to the file descriptors (XLA's C++ logging)
    reaches the terminal, not the log."""

    def __init__(self, run_dir: str | os.PathLike | None, header: str = ""):
        name = LOG_NAME if jax.process_index() == 0 else f"log.{jax.process_index()}.txt"
        self.path = Path(run_dir) / name if run_dir else None
        self._file = None
        self._early: list[str] = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} ===\n"]
        self._lock = threading.RLock()
        self._saved: tuple[Any, Any] | None = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._tees: list[_Tee] = []

    def open(self) -> Path | None:
        """The log's path, opening it now if the run directory exists; None while it does not
        (or when the log cannot be written: the command goes on without one)."""
        with self._lock:
            if self._file is None and self.path is not None and self.path.parent.is_dir():
                try:
                    self._file = open(self.path, "a", encoding="utf-8")
                    self._file.write("".join(self._early))
                    self._file.flush()
                except OSError:
                    self._file, self.path = None, None
                self._early = []
            return self.path if self._file is not None else None

    def _write(self, text: str) -> None:
        with self._lock:
            if self.open() is None:
                if self.path is not None:  # the run directory may come: keep it for then
                    self._early.append(text)
                return
            try:
                self._file.write(text)
                self._file.flush()
            except (OSError, ValueError):  # disk full, closed: the run goes on without its log
                self._file, self.path = None, None

    def _take(self, tee: _Tee, text: str) -> None:
        with self._lock:
            tee.line += text
            if "\n" in tee.line:
                *done, tee.line = tee.line.split("\n")
                self._write("".join(_shown(line) + "\n" for line in done))
            if "\r" in tee.line:  # a bar redrawn in place: keep what it shows and its newest draw
                head, _, last = tee.line.rpartition("\r")
                head = _shown(head + "\r")
                tee.line = f"{head}\r{last}" if head else last

    def detail(self, text: str) -> None:
        """Write `text` to the log only."""
        self._write(text if text.endswith("\n") else text + "\n")

    def __enter__(self) -> RunLog:
        self._saved = sys.stdout, sys.stderr
        self._tees = [_Tee(sys.stdout, self), _Tee(sys.stderr, self)]
        sys.stdout, sys.stderr = self._tees
        loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                          if isinstance(x, logging.Logger))]
        for handler in {h for x in loggers for h in x.handlers}:  # made before: they hold the real streams
            if isinstance(handler, logging.StreamHandler) and handler.stream in self._saved:
                tee = self._tees[self._saved.index(handler.stream)]
                self._handlers.append((handler, handler.setStream(tee)))
        return self

    def __exit__(self, etype, err, tb) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        sys.stdout, sys.stderr = self._saved
        with self._lock:
            for tee in self._tees:
                if tee.line:
                    self._take(tee, "\n")
            if err is not None:
                self.detail(describe_error(err))
            if self._file is not None:
                self._file.close()
            self._file, self.path = None, None  # a stream still held by a thread writes through
