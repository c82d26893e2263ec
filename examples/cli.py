"""An interactive p2ptimeline peer: register, follow, post and read from a prompt.

Run: python examples/cli.py --port 9001 --bootstrap 127.0.0.1:8468

(start bootstrap nodes first with ``python examples/bootstrap.py``). At the
prompt, type ``help`` for the commands. Posts from the users you follow are
shown as they arrive, above the line you are typing.

Passwords are never typed on the command line. On a terminal they are asked
for without echo. When the commands come from a pipe or a file (stdin is not
a terminal), the line after ``register NAME`` or ``login NAME`` is the
password, and the two lines after ``passwd`` are the current and the new
password::

    printf 'register alice\\nmy password\\npost hello\\n' | python examples/cli.py ...

Commands can also be given with ``-c "cmd; cmd"``. There, and only there,
``register NAME PASSWORD`` and ``login NAME PASSWORD`` are accepted too, for
scripts and tests; PASSWORD is the rest of the command (it is then visible
to other local users, in the process list). Without a password in the -c
form, it comes from stdin as above.

Without a terminal the exit code is 0 when every command succeeded and 1 if
any failed; every error is one line on stderr starting with ``error:``.

This file is what uses the library: the arguments, the peer, the shell and
its commands. The terminal plumbing (the line editor that keeps the prompt
intact while posts arrive) is in ``lineedit.py`` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

# lineedit.py sits beside this file, and a script's own folder is the first
# entry of sys.path: this import works from any working directory.
from lineedit import Interrupted, StdinLines, Terminal, log_above

import p2ptimeline as pt

log = logging.getLogger("cli")

HELP = """\
commands:
  register NAME       create user NAME (asks for a password) and log in
  login NAME          log in as NAME, on this or any peer (asks for the password)
  passwd              change your password (asks for the current and a new one)
  logout              log out
  follow NAME         receive NAME's posts
  unfollow NAME       stop receiving NAME's posts
  post TEXT...        publish TEXT to your followers
  timeline [N]        the N newest posts of you and whom you follow (20)
  followers [NAME]    who follows NAME (default: you)
  following [NAME]    whom NAME follows (default: you)
  suggest [N]         up to N users to follow: friends of friends (10)
  notifications       who followed or unfollowed you
  sync                fetch now the posts missed from whom you follow
  help                this text
  quit                log out and leave (also Ctrl-D)"""

TIMELINE_DEFAULT = 20
SUGGEST_DEFAULT = 10
NAME_RULE = (
    f"a username is 1 to {pt.MAX_USERNAME_CHARS} characters of a-z, 0-9, "
    "'_', '.' and '-', not starting with '.' or '-'"
)
LEAVE_HINT = "(type quit or press Ctrl-D to leave)"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
CHATTY_LIBRARIES = ("kademlia", "rpcudp")  # what p2ptimeline's DHT is built on


class CommandError(Exception):
    """A command failed; the message is the one line shown to the user."""


# Formatting


def clean(text: str) -> str:
    """`text` with control characters escaped, so no post can drive the terminal."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def clock(timestamp: pt.HybridTimestamp) -> str:
    """``HH:MM:SS`` in local time."""
    return timestamp.datetime.astimezone().strftime("%H:%M:%S")


def format_post(post: pt.Post) -> str:
    return f"[{clock(post.timestamp)}] {clean(post.author)}: {clean(post.text)}"


def describe(exc: pt.P2PTimelineError) -> str:
    """One line saying what went wrong, for an error the command did not map."""
    if isinstance(exc, pt.NotLoggedIn):
        return "not logged in (use: login NAME, or register NAME)"
    if isinstance(exc, pt.RegistryUnavailable):
        return "nobody reachable (no DHT node answered)"
    if isinstance(exc, pt.PeerUnreachable):
        return f"a peer did not answer: {exc}"
    if isinstance(exc, pt.NetworkError):
        return f"network error: {exc}"
    if isinstance(exc, pt.AuthError):
        return f"not allowed: {exc}"
    if isinstance(exc, pt.RemoteError):
        return f"bad data from the network: {exc}"
    if isinstance(exc, pt.StoreError):
        return f"the local store failed: {exc}"
    return str(exc)


def check_name(name: str) -> str:
    """`name`, if it is a valid username; else a `CommandError` saying why."""
    if pt.check_username(name):
        return name
    lower = " (usernames are lowercase)" if pt.check_username(name.lower()) else ""
    raise CommandError(f"invalid username {clean(name)!r}{lower}: {NAME_RULE}")


@contextlib.contextmanager
def about(name: str) -> Iterator[None]:
    """Report `UnknownUser` as being about `name`."""
    try:
        yield
    except pt.UnknownUser as exc:
        raise CommandError(f"unknown user {name!r}") from exc


# Where commands and passwords come from, and where output goes


class Console(Protocol):
    """The shell's input and output."""

    interactive: bool
    """Whether a person types the passwords (so `register` asks twice)."""

    def out(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...

    async def password(self, prompt: str) -> str: ...


class ScriptConsole:
    """Commands from -c or stdin: output on stdout, errors on stderr."""

    def __init__(self, stdin: StdinLines) -> None:
        self._stdin = stdin
        self.interactive = sys.stdin.isatty()

    def out(self, text: str) -> None:
        print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    async def password(self, prompt: str) -> str:
        if self.interactive:
            with Terminal(sys.stdin.fileno(), sys.stderr) as terminal:
                return await terminal.read_line(prompt, hidden=True)
        line = await self._stdin.readline()
        if line is None:
            raise CommandError("no password: it goes on the line after the command")
        return line


class TerminalConsole:
    """The interactive prompt: everything goes through the line editor."""

    interactive = True

    def __init__(self, terminal: Terminal) -> None:
        self._terminal = terminal

    def out(self, text: str) -> None:
        self._terminal.print_above(text)

    def error(self, text: str) -> None:
        self._terminal.print_above(f"error: {text}")

    async def password(self, prompt: str) -> str:
        return await self._terminal.read_line(prompt, hidden=True)


# The commands


class Shell:
    """Runs command lines against a `Peer`."""

    def __init__(self, peer: pt.Peer, console: Console, *, script: bool) -> None:
        self.peer = peer
        self.console = console
        self.script = script  # from -c: passwords allowed on the line
        self.quit = False
        self._commands: dict[str, Callable[[list[str], str], Awaitable[None]]] = {
            "register": self.register,
            "login": self.login,
            "passwd": self.passwd,
            "logout": self.logout,
            "follow": self.follow,
            "unfollow": self.unfollow,
            "post": self.post,
            "timeline": self.timeline,
            "followers": self.followers,
            "following": self.following,
            "suggest": self.suggest,
            "notifications": self.notifications,
            "sync": self.sync,
            "help": self.help,
            "quit": self.stop,
            "exit": self.stop,
        }

    def prompt(self) -> str:
        return f"{self.peer.username}> " if self.peer.username else "> "

    async def execute(self, line: str) -> bool:
        """Run one command line; False if it failed (the error is shown)."""
        words = line.split()
        if not words or words[0].startswith("#"):
            return True
        command = self._commands.get(words[0].lower())
        if command is None:
            self.console.error(f"unknown command {clean(words[0])!r} (try: help)")
            return False
        try:
            await command(words[1:], line)
        except CommandError as exc:
            self.console.error(str(exc))
        except (Interrupted, EOFError):
            pass  # Ctrl-C or Ctrl-D at a password prompt: already shown
        except pt.P2PTimelineError as exc:
            log.debug("%s failed", words[0], exc_info=True)
            self.console.error(describe(exc))
        except Exception as exc:  # a bug: still one line, details in the log
            log.debug("%s failed", words[0], exc_info=True)
            self.console.error(
                f"unexpected {type(exc).__name__}: {exc} "
                "(--log-level DEBUG shows the details)"
            )
        else:
            return True
        return False

    async def register(self, args: list[str], line: str) -> None:
        name, password = await self._credentials(
            line, "register NAME", self._can_register, confirm=True
        )
        try:
            await self.peer.register(name, password)
        except pt.UsernameTaken as exc:
            raise CommandError(f"the name {name!r} is taken") from exc
        self.console.out(f"registered and logged in as {name}")

    async def login(self, args: list[str], line: str) -> None:
        name, password = await self._credentials(
            line, "login NAME", self._can_log_in, confirm=False
        )
        with about(name):
            try:
                await self.peer.login(name, password)
            except pt.AuthError as exc:
                raise CommandError("wrong password") from exc
        news = await self.peer.notifications()
        more = (
            f" ({len(news)} notification{'s' if len(news) > 1 else ''})" if news else ""
        )
        self.console.out(f"logged in as {name}{more}")

    async def passwd(self, args: list[str], line: str) -> None:
        if self.console.interactive:
            _arguments(args, 0, 0, "passwd, then type the passwords when asked")
            if self.peer.username is None:
                raise pt.NotLoggedIn("no user is logged in")
        # Without a terminal the next two lines are the passwords: read them
        # even if the command is wrong, so that they are never run (nor shown).
        current = await self.console.password("current password: ")
        new = await self.console.password("new password: ")
        if self.console.interactive:
            pt.check_password(new, self.peer.username or "")
            if new != await self.console.password("same new password again: "):
                raise CommandError("the passwords differ")
        _arguments(args, 0, 0, "passwd (the passwords on the next two lines)")
        try:
            await self.peer.change_password(current, new)
        except pt.AuthError as exc:
            raise CommandError(str(exc)) from exc
        self.console.out(
            "password changed. Note: anyone who copied your old sealed key "
            "can still open it with the old password; if that password may be "
            "known, register a new account"
        )

    async def _credentials(
        self,
        line: str,
        usage: str,
        check: Callable[[str], Awaitable[None]],
        *,
        confirm: bool,
    ) -> tuple[str, str]:
        """The name on `line` and the password: the rest of the line in a -c
        script, else asked for (a terminal) or the next line (stdin).

        `check(name)` raises if the command cannot succeed whatever the
        password (on a terminal, before the password is asked for). With
        `confirm`, a new password is judged, then asked for again.
        """
        args = line.split(maxsplit=2)[1:]
        if self.script and len(args) == 2:
            await check(args[0])
            return args[0], args[1].strip()
        if not self.console.interactive:
            # The next line is the password: read it even if the command is
            # wrong, so that it is never run as a command (nor shown).
            password = await self.console.password("password: ")
            if len(args) != 1:
                raise CommandError(f"usage: {usage} (the password on the next line)")
            if not password:
                raise CommandError("empty password")
            await check(args[0])
            return args[0], password
        if len(args) == 2:
            raise CommandError(f"usage: {usage}, then type the password when asked")
        if len(args) != 1:
            raise CommandError(f"usage: {usage}")
        name = args[0]
        await check(name)
        password = await self.console.password(f"password for {name}: ")
        if not password:
            raise CommandError("empty password")
        if confirm:
            pt.check_password(password, name)
            if await self.console.password("same password again: ") != password:
                raise CommandError("the passwords differ")
        return name, password

    async def _can_register(self, name: str) -> None:
        """Raise unless `name` may be registered here now: nobody logged in,
        a valid name, and free as far as the registry knows."""
        self._check_logged_out()
        check_name(name)
        if await self.peer.registry.get_user(name) is not None:
            raise CommandError(f"the name {name!r} is taken")

    async def _can_log_in(self, name: str) -> None:
        """Raise unless `name` may log in here now: nobody logged in, and a
        registered user."""
        self._check_logged_out()
        check_name(name)
        if await self.peer.registry.get_user(name) is None:
            raise CommandError(f"unknown user {name!r}")

    def _check_logged_out(self) -> None:
        if self.peer.username is not None:
            raise CommandError(f"{self.peer.username} is logged in: log out first")

    async def logout(self, args: list[str], line: str) -> None:
        _arguments(args, 0, 0, "logout")
        await self.peer.logout()
        self.console.out("logged out")

    async def follow(self, args: list[str], line: str) -> None:
        (name,) = _arguments(args, 1, 1, "follow NAME")
        with about(name):
            await self.peer.follow(name)
        self.console.out(f"following {name}")

    async def unfollow(self, args: list[str], line: str) -> None:
        (name,) = _arguments(args, 1, 1, "unfollow NAME")
        with about(name):
            await self.peer.unfollow(name)
        self.console.out(f"no longer following {name}")

    async def post(self, args: list[str], line: str) -> None:
        parts = line.strip().split(maxsplit=1)
        if len(parts) < 2:
            raise CommandError("usage: post TEXT...")
        post = await self.peer.post(parts[1])
        self.console.out(f"posted at {clock(post.timestamp)}")

    async def timeline(self, args: list[str], line: str) -> None:
        limit = _count(args, TIMELINE_DEFAULT, "timeline [N]")
        posts = await self.peer.timeline(limit=limit)
        for post in posts:
            self.console.out(format_post(post))
        if not posts:
            self.console.out("(no posts yet)")

    async def followers(self, args: list[str], line: str) -> None:
        name = self._user(args, "followers [NAME]")
        with about(name):
            self._names(await self.peer.followers(name), "(nobody)")

    async def following(self, args: list[str], line: str) -> None:
        name = self._user(args, "following [NAME]")
        with about(name):
            self._names(await self.peer.following(name), "(nobody)")

    async def suggest(self, args: list[str], line: str) -> None:
        limit = _count(args, SUGGEST_DEFAULT, "suggest [N]")
        names = await self.peer.suggestions(limit=limit)
        self._names(names, "(no suggestions: they come from whom you follow)")

    async def notifications(self, args: list[str], line: str) -> None:
        _arguments(args, 0, 0, "notifications")
        news = await self.peer.notifications()
        for note in news:
            verb = "followed" if note.kind == "follow" else "unfollowed"
            self.console.out(f"[{clock(note.timestamp)}] {note.user} {verb} you")
        if not news:
            self.console.out("(no notifications)")

    async def sync(self, args: list[str], line: str) -> None:
        _arguments(args, 0, 0, "sync")
        new = await self.peer.sync()
        self.console.out(f"{new} new post{'' if new == 1 else 's'}")

    async def help(self, args: list[str], line: str) -> None:
        _arguments(args, 0, 0, "help")
        self.console.out(HELP)

    async def stop(self, args: list[str], line: str) -> None:
        _arguments(args, 0, 0, "quit")
        self.quit = True

    def _user(self, args: list[str], usage: str) -> str:
        _arguments(args, 0, 1, usage)
        if args:
            return check_name(args[0])
        if self.peer.username is None:
            raise CommandError("not logged in: give a NAME, or log in")
        return self.peer.username

    def _names(self, names: list[str], empty: str) -> None:
        for name in names:
            self.console.out(name)
        if not names:
            self.console.out(empty)


def _arguments(args: list[str], least: int, most: int, usage: str) -> list[str]:
    if not least <= len(args) <= most:
        raise CommandError(f"usage: {usage}")
    return args


def _count(args: list[str], default: int, usage: str) -> int:
    """The number N in `args` (at least 1; `default` if none)."""
    _arguments(args, 0, 1, usage)
    if not args:
        return default
    try:
        count = int(args[0])
    except ValueError:
        count = 0
    if count < 1:
        raise CommandError(
            f"N is a whole number from 1 up, not {clean(args[0][:40])!r} "
            f"(usage: {usage})"
        )
    return count


# Running


class Signals:
    """SIGINT and SIGTERM, sent to whoever handles them at the moment."""

    def __init__(self, default: Callable[[signal.Signals], None]) -> None:
        self.handler = default
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._dispatch, signum)

    def _dispatch(self, signum: signal.Signals) -> None:
        self.handler(signum)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def run_script(peer: pt.Peer, command: str | None) -> int:
    """Run the commands of -c, or else of stdin; 0 if all succeeded, else 1."""
    stdin = StdinLines()
    shell = Shell(peer, ScriptConsole(stdin), script=command is not None)
    pending = command.split(";") if command is not None else []
    failures = 0
    while not shell.quit:
        if command is None:
            line = await stdin.readline()
        else:
            line = pending.pop(0) if pending else None
        if line is None:
            break
        if not await shell.execute(line):
            failures += 1
    return 1 if failures else 0


async def run_interactive(peer: pt.Peer, terminal: Terminal, signals: Signals) -> int:
    """The prompt, until quit, Ctrl-D or SIGTERM."""
    loop = asyncio.get_running_loop()
    shell = Shell(peer, TerminalConsole(terminal), script=False)
    running: asyncio.Task[bool] | None = None
    stopping = False

    def on_signal(signum: signal.Signals) -> None:
        nonlocal stopping
        if signum == signal.SIGTERM:  # leave, whatever is going on
            stopping = True
            terminal.interrupt(EOFError(), echo="")
            if running is not None:
                running.cancel()
        elif terminal.reading:  # Ctrl-C at a prompt: drop the line
            terminal.interrupt(Interrupted())
        elif running is not None:  # Ctrl-C during a command: stop it
            running.cancel()

    async def show_incoming() -> None:
        async for post in peer.incoming():
            terminal.print_above(f"* {format_post(post)}")

    default_handler, signals.handler = signals.handler, on_signal
    loop.add_signal_handler(signal.SIGCONT, terminal.resume)  # after Ctrl-Z, fg
    with log_above(terminal, logging.Formatter(LOG_FORMAT)):
        shower = asyncio.create_task(show_incoming())
        host, port = peer.address
        terminal.print_above(
            f"p2ptimeline {pt.__version__}: peer on {host}:{port}. "
            "Type 'help' for the commands."
        )
        hinted = False  # how to leave, told at the first Ctrl-C at the prompt
        try:
            while not (stopping or shell.quit):
                try:
                    line = await terminal.read_line(shell.prompt())
                except EOFError:
                    break
                except Interrupted:
                    if not hinted:
                        terminal.print_above(LEAVE_HINT)
                        hinted = True
                    continue
                running = asyncio.create_task(shell.execute(line))
                await asyncio.wait([running])
                if running.cancelled() and not stopping:
                    terminal.print_above("interrupted")
                running = None
        finally:
            shower.cancel()
            await asyncio.gather(shower, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGCONT)
            signals.handler = default_handler
    print("bye", flush=True)
    return 0


async def run(args: argparse.Namespace) -> int:
    """Start the peer, run the commands, stop the peer; returns the exit code."""
    work = asyncio.current_task()
    assert work is not None
    interrupted = started = False

    def cancel(signum: signal.Signals) -> None:
        nonlocal interrupted
        interrupted = True
        work.cancel()

    signals = Signals(cancel)
    if not args.bootstrap:
        print(
            "warning: no --bootstrap given: a peer alone reaches no registry "
            "(start python examples/bootstrap.py and pass --bootstrap HOST:PORT)",
            file=sys.stderr,
        )
    interactive = args.command is None and sys.stdin.isatty() and sys.stdout.isatty()
    # On a terminal, echo goes off at once: what is typed while the peer
    # starts is kept for the prompt, and a password typed early never shows.
    terminal = Terminal(sys.stdin.fileno(), sys.stdout) if interactive else None
    try:
        peer = pt.Peer(
            args.host,
            args.port,
            args.bootstrap,
            advertised_host=args.advertise,
            data_dir=args.data_dir,
            clock=pt.ClockSync(servers=args.ntp),
            config=pt.PeerConfig(seal_cost=args.seal_cost),
        )
        with terminal or contextlib.nullcontext():
            async with peer:
                started = True
                if terminal is not None:
                    return await run_interactive(peer, terminal, signals)
                return await run_script(peer, args.command)
    except (pt.P2PTimelineError, OSError) as exc:
        # Commands report their own errors: this is about starting the peer,
        # or stopping it, or an output that went away.
        doing = "" if started else "cannot start the peer: "
        print(f"error: {doing}{exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print("error: interrupted", file=sys.stderr)
        return 1
    finally:
        signals.close()


def address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPV6]:PORT``; PORT optional with a default) as a pair."""
    host, colon, port = text.rpartition(":")
    if not colon or "]" in port:
        host, port = text, ""
    host = host.removeprefix("[").removesuffix("]")
    if not port and default_port is not None:
        return host, default_port
    if host and port.isdigit() and not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a port is a number from 1 to 65535, not {port}"
        )
    if not host or not port.isdigit():
        form = "HOST[:PORT]" if default_port is not None else "HOST:PORT"
        raise argparse.ArgumentTypeError(f"{text!r} is not {form}")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="An interactive p2ptimeline peer.",
        epilog="Without a terminal on stdin, or with -c, runs the commands and "
        "exits with 0 if all succeeded, 1 otherwise. There the line after "
        "'register NAME' or 'login NAME' is the password; -c also accepts "
        "'register NAME PASSWORD' and 'login NAME PASSWORD' (scripts only).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (%(default)s)"
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST",
        help="address other peers reach this one at (default: --host; "
        "needed with --host 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="UDP and TCP port of this peer (default: any free port)",
    )
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        type=address,
        action="append",
        default=[],
        help="a DHT node to join through, e.g. one of bootstrap.py (repeatable)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep identities and posts in DIR across runs (default: in memory)",
    )
    parser.add_argument(
        "--ntp",
        metavar="HOST[:PORT]",
        type=lambda text: address(text, default_port=123),
        action="append",
        default=[],
        help="an NTP server to correct the clock with (repeatable; "
        "default: none, the local clock is trusted as is)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe log lines shown, on stderr (%(default)s; INFO "
        "adds the library's routine events, DEBUG also the kademlia and "
        "rpcudp libraries' lines)",
    )
    parser.add_argument(
        "-c",
        dest="command",
        metavar='"CMD; CMD"',
        help="run these commands, separated by ';', instead of reading stdin",
    )
    # Advanced: the cost of sealing keys (log2 of the Argon2id memory in KiB);
    # tests make it cheap.
    parser.add_argument(
        "--seal-cost",
        type=int,
        default=pt.PeerConfig().seal_cost,
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error("--port must lie between 0 and 65535")
    return args


def configure_logging(level: str) -> None:
    """Log lines on stderr from `level` up, but those of the libraries under
    the DHT (`CHATTY_LIBRARIES`) from WARNING up unless `level` is DEBUG.

    The default, WARNING, keeps the library's INFO lines off the prompt: they
    are routine events (a followee with nobody online to catch up from, a
    dropped datagram), not something the user has to act on.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if level != "DEBUG":
        quieter = max(logging.WARNING, logging.getLevelNamesMapping()[level])
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(quieter)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
