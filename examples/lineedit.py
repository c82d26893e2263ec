"""Reading lines for examples/cli.py: a small line editor for a terminal, and
lines of stdin from anywhere else.

Nothing here is about p2ptimeline; it is the terminal plumbing that lets the
CLI keep its prompt while posts arrive:

* `Terminal`: a one-line editor in cbreak mode, driven by the asyncio event
  loop. `print_above` prints a line (a post, a log line) above the line
  being typed and draws the prompt and the partial input again, which
  `input()` cannot do. It keeps a history (Up/Down), reads passwords without
  echo (`read_line(hidden=True)`, never kept in the history), and leaves the
  terminal as it found it.
* `log_above`: while it is active, log lines go through `print_above`
  instead of across the prompt.
* `StdinLines`: lines of stdin when the commands come from there (a pipe,
  a file, or a terminal whose output goes elsewhere), read by a thread so
  that any stdin works and a pending read never holds up the exit.

POSIX only (`termios`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

__all__ = ["MAX_LINE", "Interrupted", "StdinLines", "Terminal", "log_above"]

MAX_LINE = 2_000
"""Most characters of a line typed or pasted; the rest of a longer paste is
dropped (each key redraws the line: a megabyte pasted took a minute)."""


class Interrupted(Exception):
    """The user pressed Ctrl-C while asked for a line."""


# The line editor


class Terminal:
    """A one-line editor on a terminal, in cbreak mode, driven by the event loop.

    Unlike `input()`, it lets other output (posts arriving, log lines) be
    printed while a line is being typed: `print_above` clears the line,
    prints, and draws the prompt and the partial input again. Keys: the
    arrows, Home/End, Backspace/Delete, Ctrl-A/E/B/F/U/K/W/L/P/N, Ctrl-D.
    Ctrl-C stays a signal (the owner calls `interrupt`). Long lines scroll
    horizontally; characters are assumed one column wide.
    """

    def __init__(self, fd: int, output: TextIO) -> None:
        self._fd = fd
        self._output = output
        self._saved: list[Any] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # typed, not yet processed (type-ahead)
        self._history: list[str] = []
        self._line: _Edit | None = None

    def __enter__(self) -> Terminal:
        self._saved = termios.tcgetattr(self._fd)
        self.cbreak()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def cbreak(self) -> None:
        """Keys one by one, no echo; Ctrl-C and Ctrl-Z still send signals."""
        mode = termios.tcgetattr(self._fd)
        mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self._fd, termios.TCSADRAIN, mode)

    @property
    def reading(self) -> bool:
        """Whether a line is being read."""
        return self._line is not None

    async def read_line(self, prompt: str, *, hidden: bool = False) -> str:
        """Show `prompt` and return the line typed (without echo if `hidden`).

        Raises:
            EOFError: Ctrl-D on an empty line, or the end of input.
            Interrupted: `interrupt()` was called (Ctrl-C).
        """
        loop = asyncio.get_running_loop()
        edit = _Edit(prompt=prompt, hidden=hidden, done=loop.create_future())
        self._line = edit
        self._refresh()
        loop.add_reader(self._fd, self._on_readable)
        try:
            self._process()
            return await edit.done
        finally:
            loop.remove_reader(self._fd)
            if self._line is edit:
                self._line = None

    def interrupt(self, exc: BaseException, echo: str = "^C") -> None:
        """End the line being read with `exc`; typed-ahead input is dropped."""
        edit = self._line
        if edit is None:
            return
        self._line = None
        self._pending = ""
        self._write(f"{echo}\n")
        edit.done.set_exception(exc)

    def print_above(self, text: str) -> None:
        """Print `text` on its own line(s), keeping the line being typed intact."""
        if self._line is None:
            self._write(f"{text}\n")
        else:
            self._write(f"\r\x1b[K{text}\n")
            self._refresh()

    def resume(self) -> None:
        """Back in cbreak mode, with the line being typed drawn again: for
        SIGCONT, since the shell resets the terminal after Ctrl-Z and fg."""
        self.cbreak()
        if self._line is not None:
            self._refresh()

    # Input

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._fd)
            edit, self._line = self._line, None
            if edit is not None and not edit.done.done():
                self._write("\n")
                edit.done.set_exception(EOFError())
            return
        text = self._decoder.decode(data)
        if text == "\x1b":
            return  # a lone Escape key: nothing to do
        self._pending += text
        self._process()

    def _process(self) -> None:
        while self._line is not None and self._pending:
            key, rest = _split_key(self._pending)
            if key is None:
                return  # an escape sequence cut between two reads
            self._pending = rest
            self._key(self._line, key)

    def _key(self, edit: _Edit, key: str) -> None:
        action = _KEYS.get(key)
        if action is None:
            if len(edit.text) >= MAX_LINE:  # a huge paste: keep the first part
                return
            if key.isprintable() and len(key) == 1:
                edit.text = edit.text[: edit.pos] + key + edit.text[edit.pos :]
                edit.pos += 1
                self._refresh()
            return
        if action == "enter":
            self._enter(edit)
        elif action == "cancel":
            self.interrupt(Interrupted())
        elif action == "eof":
            if not edit.text:
                self.interrupt(EOFError(), echo="")
                return
            edit.text = edit.text[: edit.pos] + edit.text[edit.pos + 1 :]
        elif action == "clear":
            self._write("\x1b[H\x1b[2J")
        elif action in ("up", "down"):
            self._browse(edit, -1 if action == "up" else 1)
        else:
            edit.text, edit.pos = _EDITS[action](edit.text, edit.pos)
        self._refresh()

    def _enter(self, edit: _Edit) -> None:
        edit.pos = len(edit.text)
        self._refresh()
        self._write("\n")
        self._line = None
        fresh = not self._history or self._history[-1] != edit.text
        if not edit.hidden and edit.text.strip() and fresh:
            self._history.append(edit.text)
        edit.done.set_result(edit.text)

    def _browse(self, edit: _Edit, step: int) -> None:
        if edit.hidden:
            return
        if edit.index is None:
            edit.index, edit.draft = len(self._history), edit.text
        index = min(max(edit.index + step, 0), len(self._history))
        edit.index = index
        edit.text = self._history[index] if index < len(self._history) else edit.draft
        edit.pos = len(edit.text)

    # Output

    def _refresh(self) -> None:
        edit = self._line
        if edit is None:
            return
        columns = self._columns()
        text, pos = ("", 0) if edit.hidden else (edit.text, edit.pos)
        width = len(edit.prompt)
        # Keep the cursor on screen, and off the last column (the terminal
        # would wrap there): show the window of the line around it.
        start = max(0, width + pos - (columns - 1))
        visible = text[start : start + max(columns - 1 - width, 0)]
        column = width + pos - start
        move = f"\r\x1b[{column}C" if column else "\r"
        self._write(f"\r{edit.prompt}{visible}\x1b[K{move}")

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self._output.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns if columns > 10 else 80

    def _write(self, text: str) -> None:
        self._output.write(text)
        self._output.flush()


class _Edit:
    """The line being edited."""

    def __init__(self, *, prompt: str, hidden: bool, done: asyncio.Future[str]) -> None:
        self.prompt = prompt
        self.hidden = hidden
        self.done = done
        self.text = ""
        self.pos = 0
        self.index: int | None = None  # position in the history, when browsing
        self.draft = ""  # the line typed before browsing the history


_KEYS = {
    "\x03": "cancel",  # Ctrl-C, when the terminal does not make it a signal
    "\r": "enter",
    "\n": "enter",
    "\x7f": "backspace",
    "\x08": "backspace",
    "\x04": "eof",
    "\x01": "home",
    "\x05": "end",
    "\x02": "left",
    "\x06": "right",
    "\x0b": "kill_end",
    "\x15": "kill_start",
    "\x17": "kill_word",
    "\x0c": "clear",
    "\x10": "up",
    "\x0e": "down",
    "\x1b[A": "up",
    "\x1b[B": "down",
    "\x1b[C": "right",
    "\x1b[D": "left",
    "\x1bOA": "up",
    "\x1bOB": "down",
    "\x1bOC": "right",
    "\x1bOD": "left",
    "\x1b[H": "home",
    "\x1b[F": "end",
    "\x1bOH": "home",
    "\x1bOF": "end",
    "\x1b[1~": "home",
    "\x1b[7~": "home",
    "\x1b[4~": "end",
    "\x1b[8~": "end",
    "\x1b[3~": "delete",
}


def _kill_word(text: str, pos: int) -> tuple[str, int]:
    start = len(text[:pos].rstrip())
    start = text.rfind(" ", 0, start) + 1
    return text[:start] + text[pos:], start


_EDITS: dict[str, Callable[[str, int], tuple[str, int]]] = {
    "backspace": lambda t, p: (t[: p - 1] + t[p:], p - 1) if p else (t, p),
    "delete": lambda t, p: (t[:p] + t[p + 1 :], p),
    "home": lambda t, p: (t, 0),
    "end": lambda t, p: (t, len(t)),
    "left": lambda t, p: (t, max(p - 1, 0)),
    "right": lambda t, p: (t, min(p + 1, len(t))),
    "kill_end": lambda t, p: (t[:p], p),
    "kill_start": lambda t, p: (t[p:], 0),
    "kill_word": _kill_word,
}


def _split_key(text: str) -> tuple[str | None, str]:
    """The first key of `text` (one character or an escape sequence) and the
    rest; ``None`` if `text` ends in the middle of an escape sequence."""
    if text[0] != "\x1b":
        return text[0], text[1:]
    if len(text) < 2:
        return None, text
    if text[1] == "[":  # CSI: parameters, then a final byte in @..~
        for i in range(2, len(text)):
            if "@" <= text[i] <= "~":
                return text[: i + 1], text[i + 1 :]
        return None, text
    if text[1] == "O":  # SS3: one more character
        return (text[:3], text[3:]) if len(text) >= 3 else (None, text)
    return text[:2], text[2:]  # Alt+key: ignored


# Lines of stdin


class StdinLines:
    """Lines of stdin, read by a daemon thread so that any stdin works (a pipe,
    a file, a terminal) and a pending read never holds up the exit.

    The thread reads only when a line is asked for, so that a password
    prompt on the same terminal gets the keys typed for it.
    """

    def __init__(self) -> None:
        self._wanted = threading.Semaphore(0)
        self._queue: asyncio.Queue[str | None] | None = None
        self._ended = False

    async def readline(self) -> str | None:
        """The next line without its end, or None at the end of input."""
        if self._ended:
            return None
        if self._queue is None:
            self._queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            thread = threading.Thread(
                target=self._pump, args=(loop, self._queue), daemon=True
            )
            thread.start()
        self._wanted.release()
        line = await self._queue.get()
        self._ended = line is None
        return line

    def _pump(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]
    ) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        ended = False
        try:
            while True:
                self._wanted.acquire()
                while "\n" not in pending and not ended:
                    try:
                        data = os.read(0, 65536)
                    except OSError:
                        data = b""
                    ended = not data
                    pending += decoder.decode(data, final=ended)
                line: str | None
                if "\n" in pending:
                    line, pending = pending.split("\n", 1)
                    line = line.rstrip("\r")
                else:
                    line, pending = (pending or None), ""
                loop.call_soon_threadsafe(queue.put_nowait, line)
                if line is None:
                    return
        except RuntimeError:
            return  # the event loop is closed: nobody is listening any more


# Log lines above the prompt


class TerminalLogHandler(logging.Handler):
    """Log lines printed above the prompt instead of across it."""

    def __init__(self, terminal: Terminal, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._terminal = terminal
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if threading.current_thread() is threading.main_thread():
                self._terminal.print_above(line)
            else:
                self._loop.call_soon_threadsafe(self._terminal.print_above, line)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def log_above(terminal: Terminal, formatter: logging.Formatter) -> Iterator[None]:
    """Within this block, the root logger's lines are printed above the prompt
    of `terminal` (formatted by `formatter`) instead of by its own handlers.

    Call it from the event loop's thread: log lines from other threads are
    handed to the loop.
    """
    handler = TerminalLogHandler(terminal, asyncio.get_running_loop())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved
