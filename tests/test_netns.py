"""Peers on separate hosts: Linux network namespaces joined by a bridge.

Each test builds a small LAN: a bridge in the root namespace and four
namespaces (a bootstrap host and three peer hosts), each with its own address
on a veth pair to the bridge. examples/bootstrap.py runs on the first host and
one examples/cli.py per peer host, driven through its stdin. Nothing listens
outside these namespaces.

Latency and loss come from ``tc netem``. Where the kernel is built without
it (``CONFIG_NET_SCH_NETEM``), `Relay` does the same in user space.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``tc``: skipped
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import random
import re
import secrets
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PORT = 7400  # each host has its own address: the same port on every one
PASSWORD = "netns pw"
TIME = r"\[\d\d:\d\d:\d\d\]"
PIPE = asyncio.subprocess.PIPE


# The hosts


def run(*command: str) -> None:
    """Run `command` (``ip ...``, ``tc ...``); fail with its message."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


async def arun(*command: str) -> None:
    """`run`, without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(*command, stdout=PIPE, stderr=PIPE)
    async with asyncio.timeout(10):
        _, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {err.decode().strip()}")


@dataclass(frozen=True)
class Host:
    """A network namespace with one interface on the bridge."""

    netns: str
    address: str
    uplink: str
    """The bridge's end of the host's veth pair, in the root namespace."""
    link: str = "eth0"
    """The host's end of the veth pair, in its namespace."""


@dataclass(frozen=True)
class Lan:
    """Hosts on one bridge; the first one is for the bootstrap node."""

    tag: str
    """Unique to this LAN, in the name of each of its devices."""
    bridge: str
    hosts: list[Host]


@pytest.fixture(scope="module")
def impairment() -> str | None:
    """Skip unless network namespaces can be made here. How latency and loss
    can be had: "netem", "relay" (a kernel without netem) or None."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool!r} (iproute2), which is not installed")
    probe = f"p2pt-probe-{secrets.token_hex(4)}"
    try:
        run("ip", "netns", "add", probe)
    except RuntimeError as exc:
        pytest.skip(f"cannot create network namespaces here (needs root): {exc}")
    try:
        run("ip", "-n", probe, "link", "set", "lo", "up")
        netem = ("root", "netem", "delay", "1ms")
        run("tc", "-n", probe, "qdisc", "add", "dev", "lo", *netem)
    except RuntimeError:  # "Specified qdisc kind is unknown"
        return "relay" if Path("/dev/net/tun").exists() else None
    else:
        return "netem"
    finally:
        run("ip", "netns", "del", probe)


def free_subnet() -> str:
    """The first three bytes of a /24 in 10.213.0.0/16 that no address or
    route of the root namespace is in."""
    shown = subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
    ).stdout
    shown += subprocess.run(
        ["ip", "-4", "route"], capture_output=True, text=True, check=True
    ).stdout
    taken = [
        ipaddress.ip_network(found, strict=False)
        for found in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", shown)
    ]
    for third in range(77, 256):
        subnet = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(subnet.overlaps(network) for network in taken):
            return f"10.213.{third}"
    raise RuntimeError("no free /24 in 10.213.0.0/16")


@pytest.fixture
def lan(impairment: str | None) -> Iterator[Lan]:
    """A bridge and four namespaces on it, 10.213.X.1-4; all deleted at the end."""
    tag = secrets.token_hex(3)
    subnet = free_subnet()
    bridge = f"p2pt{tag}br"
    hosts = [
        Host(
            netns=f"p2pt-{os.getpid()}-{tag}-{role}",
            address=f"{subnet}.{i}",
            uplink=f"p2pt{tag}up{i}",
        )
        for i, role in enumerate(["boot", "peer2", "peer3", "peer4"], start=1)
    ]
    try:
        run("ip", "link", "add", bridge, "type", "bridge")
        run("ip", "link", "set", bridge, "up")
        for host in hosts:
            ns = ("ip", "-n", host.netns)
            run("ip", "netns", "add", host.netns)
            run(
                *("ip", "link", "add", host.uplink, "type", "veth"),
                *("peer", "name", host.link, "netns", host.netns),
            )
            run("ip", "link", "set", host.uplink, "master", bridge, "up")
            run(*ns, "addr", "add", f"{host.address}/24", "dev", host.link)
            run(*ns, "link", "set", host.link, "up")
            run(*ns, "link", "set", "lo", "up")
        yield Lan(tag=tag, bridge=bridge, hosts=hosts)
    finally:
        for host in hosts:
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "del", host.netns)  # its veth pair goes too
            with contextlib.suppress(RuntimeError):
                run("ip", "link", "del", host.uplink)  # if it never got there
        with contextlib.suppress(RuntimeError):
            run("ip", "link", "del", bridge)


# Latency and loss


@contextlib.asynccontextmanager
async def impaired(
    lan: Lan,
    hosts: list[Host],
    how: str | None,
    *,
    delay: float,
    jitter: float,
    loss: float,
) -> AsyncIterator[None]:
    """What leaves each of `hosts` is late by `delay` ± `jitter` seconds, and
    lost with probability `loss`: with ``tc netem``, or a `Relay` (see
    `impairment` for `how`)."""
    if how is None:
        pytest.skip("the kernel has no netem qdisc, and /dev/net/tun is missing")
    if how == "netem":
        for host in hosts:
            await arun(
                *("tc", "-n", host.netns, "qdisc", "add", "dev", host.link),
                *("root", "netem", "delay", f"{delay * 1000:g}ms"),
                *(f"{jitter * 1000:g}ms", "loss", f"{loss * 100:g}%"),
            )
        yield  # the qdiscs go with the namespaces
        return
    relays: list[Relay] = []
    try:
        for i, host in enumerate(hosts):
            relays.append(Relay(lan, host, f"p2pt{lan.tag}r{i}"))
            await relays[-1].start(delay=delay, jitter=jitter, loss=loss)
        yield
    finally:
        for relay in relays:
            relay.close()


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(name: str) -> int:
    """A new tap device `name`, in the root namespace; its file descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
        )
    except OSError:
        os.close(fd)
        raise
    return fd


class Relay:
    """netem's delay and loss in user space, on what a host sends.

    ``tc`` (u32 matching everything, mirred) redirects each frame the host
    sends on its interface to a tap device in its namespace; the relay reads
    it, drops it or, after the delay, writes it into a tap device on the
    bridge, as if it came down the host's veth. Frames to the host still come
    through its veth: the bridge floods them, since it learns nothing on the
    relay's port; the relay reads and drops the copies it gets.
    """

    def __init__(self, lan: Lan, host: Host, name: str) -> None:
        self._lan = lan
        self._host = host
        self._name = name
        self._fds: list[int] = []
        self._closed = False
        self._random = random.Random()

    async def start(self, *, delay: float, jitter: float, loss: float) -> None:
        loop = asyncio.get_running_loop()
        host, ns = self._host, ("ip", "-n", self._host.netns)
        outlet, inlet = f"{self._name}o", f"{self._name}i"
        out_fd = self._open(outlet)
        await arun("ip", "link", "set", outlet, "netns", host.netns)
        await arun(*ns, "link", "set", outlet, "up")
        in_fd = self._open(inlet)
        await arun("ip", "link", "set", inlet, "master", self._lan.bridge, "up")
        await arun(
            "ip", "link", "set", inlet, "type", "bridge_slave", "learning", "off"
        )

        def forward() -> None:
            while True:
                try:
                    frame = os.read(out_fd, 65536)
                except BlockingIOError:
                    return
                if self._random.random() < loss:
                    continue
                late = self._random.uniform(delay - jitter, delay + jitter)
                loop.call_later(max(late, 0.0), deliver, frame)

        def deliver(frame: bytes) -> None:
            if self._closed:
                return  # in_fd is closed, its number maybe someone else's
            with contextlib.suppress(OSError):  # a full queue: one more loss
                os.write(in_fd, frame)

        def discard() -> None:
            with contextlib.suppress(OSError):
                while os.read(in_fd, 65536):
                    pass

        loop.add_reader(out_fd, forward)
        loop.add_reader(in_fd, discard)
        tc = ("tc", "-n", host.netns)
        await arun(*tc, "qdisc", "add", "dev", host.link, "clsact")
        await arun(
            *tc,
            *("filter", "add", "dev", host.link, "egress", "protocol", "all"),
            *("u32", "match", "u32", "0", "0"),
            *("action", "mirred", "egress", "redirect", "dev", outlet),
        )

    def _open(self, name: str) -> int:
        fd = open_tap(name)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Stop relaying; the tap devices go away with their descriptors."""
        loop = asyncio.get_running_loop()
        self._closed = True
        for fd in self._fds:
            loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()


# The processes


async def spawn(host: Host, script: str, *args: str) -> asyncio.subprocess.Process:
    """Start `script` from examples/ with this Python, in `host`'s namespace."""
    return await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", host.netns, sys.executable),
        *(str(EXAMPLES / script), *args),
        stdin=PIPE,
        stdout=PIPE,
        stderr=PIPE,
    )


async def collect(stream: asyncio.StreamReader | None, lines: list[str]) -> None:
    """Append the lines of `stream` to `lines` until it ends (so that a chatty
    process never blocks on a full pipe)."""
    assert stream is not None
    async for line in stream:
        lines.append(line.decode().rstrip("\n"))


async def stop(process: asyncio.subprocess.Process, within: float = 10.0) -> None:
    """Wait for `process` to end, killing it after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


class Cli:
    """A long-lived examples/cli.py on a host, driven through its stdin.

    The CLI marks no end of a command's output, so `run` follows each command
    with ``help``, whose text starts with "commands:" and ends with "quit".
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.errors: list[str] = []
        """What it wrote on stderr so far."""
        self._collector = asyncio.create_task(collect(process.stderr, self.errors))

    @classmethod
    async def start(cls, name: str, host: Host, boot: Host) -> Cli:
        process = await spawn(
            host,
            "cli.py",
            *("--host", host.address, "--port", str(PORT)),
            *("--bootstrap", f"{boot.address}:{PORT}"),
            *("--seal-cost", "10", "--log-level", "WARNING"),
        )
        return cls(name, process)

    async def _line(self) -> str:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise AssertionError(f"{self.name}'s CLI ended; stderr: {self.errors}")
        return line.decode().rstrip("\n")

    async def run(self, *lines: str, within: float = 20.0) -> list[str]:
        """Send a command (and its password, if any); the lines it printed."""
        assert self.process.stdin is not None
        self.process.stdin.write(
            "".join(f"{line}\n" for line in (*lines, "help")).encode()
        )
        await self.process.stdin.drain()
        output: list[str] = []
        async with asyncio.timeout(within):
            while (line := await self._line()) != "commands:":
                output.append(line)
            while not (await self._line()).lstrip().startswith("quit"):
                pass
        return output

    async def do(self, *lines: str, expect: str) -> None:
        """Run a command that must print a line matching the regex `expect`."""
        output = await self.run(*lines)
        found = any(re.fullmatch(expect, line) for line in output)
        assert found, (self.name, lines[0], output, self.errors)

    async def poll(
        self, *lines: str, wanted: Callable[[list[str]], bool], within: float = 20.0
    ) -> list[str]:
        """Run a command until its output is `wanted`, for up to `within` seconds."""
        output: list[str] = []
        try:
            async with asyncio.timeout(within):
                while True:
                    output = await self.run(*lines)
                    if wanted(output):
                        return output
                    await asyncio.sleep(0.2)  # between polls, not to synchronise
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: {lines[0]!r} never gave what was wanted in {within} s;"
                f" last output: {output}; stderr: {self.errors}"
            ) from None

    async def sees(self, *texts: str, within: float = 20.0) -> None:
        """Wait until alice's posts `texts` are all in the timeline."""

        def seen(output: list[str]) -> bool:
            return all(
                any(re.fullmatch(rf"{TIME} alice: {re.escape(t)}", o) for o in output)
                for t in texts
            )

        await self.poll("timeline 50", wanted=seen, within=within)

    async def close(self) -> None:
        """End the input (the CLI logs out and exits), kill it if it hangs."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        await stop(self.process)
        await self._collector


@contextlib.asynccontextmanager
async def network(lan: Lan) -> AsyncIterator[list[Cli]]:
    """The bootstrap node on the first host; alice, bob and carol's CLIs (not
    yet registered) on the other three, in that order."""
    boot = lan.hosts[0]
    bootstrap = await spawn(
        boot,
        "bootstrap.py",
        *("--host", boot.address, "--port", str(PORT), "--count", "1"),
        *("--log-level", "WARNING"),
    )
    errors: list[str] = []
    collector = asyncio.create_task(collect(bootstrap.stderr, errors))
    clis: list[Cli] = []
    try:
        assert bootstrap.stdout is not None
        async with asyncio.timeout(10):
            while (line := await bootstrap.stdout.readline()) != b"ready\n":
                assert line, f"bootstrap.py ended before it was ready: {errors}"
        for name, host in zip(["alice", "bob", "carol"], lan.hosts[1:], strict=True):
            clis.append(await Cli.start(name, host, boot))
        yield clis
    finally:
        await asyncio.gather(*(cli.close() for cli in clis))
        if bootstrap.returncode is None:
            bootstrap.terminate()
        await stop(bootstrap)
        await collector
    for lines in [errors, *(cli.errors for cli in clis)]:
        assert not any("Traceback" in line for line in lines), lines


async def register_and_follow(alice: Cli, bob: Cli, carol: Cli) -> None:
    """Each registers on their host; bob and carol follow alice."""
    await asyncio.gather(
        *(
            cli.do(
                f"register {cli.name}",
                PASSWORD,
                expect=f"registered and logged in as {cli.name}",
            )
            for cli in (alice, bob, carol)
        )
    )
    await asyncio.gather(
        bob.do("follow alice", expect="following alice"),
        carol.do("follow alice", expect="following alice"),
    )


def followers_are(*names: str) -> Callable[[list[str]], bool]:
    """Whether the output of ``followers`` is exactly `names`."""
    return lambda output: sorted(output) == sorted(names)


# The tests


async def test_follow_and_post_across_hosts(lan: Lan) -> None:
    """On three hosts, bob and carol follow alice, get her post, and are listed
    as her followers on every host."""
    async with network(lan) as (alice, bob, carol):
        await register_and_follow(alice, bob, carol)
        await alice.do("post hello across hosts", expect=r"posted at .*")
        await asyncio.gather(
            bob.sees("hello across hosts"), carol.sees("hello across hosts")
        )
        await asyncio.gather(
            *(
                cli.poll("followers alice", wanted=followers_are("bob", "carol"))
                for cli in (alice, bob, carol)
            )
        )


async def test_latency_and_loss(lan: Lan, impairment: str | None) -> None:
    """With 50 ± 10 ms delay and 5 % loss on each peer host, follows, posts and
    catch-up still converge."""
    async with (
        impaired(lan, lan.hosts[1:], impairment, delay=0.05, jitter=0.01, loss=0.05),
        network(lan) as (alice, bob, carol),
    ):
        await register_and_follow(alice, bob, carol)
        texts = [f"lossy post {i}" for i in range(3)]
        for text in texts:
            await alice.do(f"post {text}", expect=r"posted at .*")
        await asyncio.gather(bob.sees(*texts), carol.sees(*texts))
        # Logged out, carol's peer keeps no pushed post: only login's pull
        # brings her what alice posts meanwhile.
        await carol.do("logout", expect="logged out")
        await alice.do("post while carol is away", expect=r"posted at .*")
        await carol.do("login carol", PASSWORD, expect=r"logged in as carol.*")
        await carol.sees(*texts, "while carol is away")
        await bob.sees("while carol is away")
        await asyncio.gather(
            *(
                cli.poll("followers alice", wanted=followers_are("bob", "carol"))
                for cli in (alice, bob, carol)
            )
        )


async def test_partition_and_heal(lan: Lan) -> None:
    """A post made while carol's host is cut off reaches her after the heal."""
    async with network(lan) as (alice, bob, carol):
        await register_and_follow(alice, bob, carol)
        await alice.do("post before the cut", expect=r"posted at .*")
        await asyncio.gather(bob.sees("before the cut"), carol.sees("before the cut"))
        cable = lan.hosts[3].uplink  # carol's, unplugged at the bridge
        await arun("ip", "link", "set", cable, "down")
        try:
            await alice.do("post during the cut", expect=r"posted at .*")
            await bob.sees("during the cut")
            timeline = await carol.run("timeline")
            assert not any("during the cut" in line for line in timeline), timeline
            # Logged out, carol's peer keeps no late push from alice: the
            # post can only come by login's pull, after the heal.
            await carol.do("logout", expect="logged out")
        finally:
            await arun("ip", "link", "set", cable, "up")
        # Calls that failed during the cut make carol's DHT node skip the
        # other nodes for up to 30 s (UNREACHABLE_FOR): until then her login
        # can fail with "nobody reachable", and she tries again.
        await carol.poll(
            "login carol",
            PASSWORD,
            wanted=lambda output: any(
                re.fullmatch(r"logged in as carol.*", line) for line in output
            ),
            within=40,
        )
        await carol.sees("before the cut", "during the cut")
