"""Run the bootstrap nodes of a p2ptimeline network.

Bootstrap nodes are bare DHT nodes (`p2ptimeline.DhtRegistry`) that peers
contact first to join the network. This starts `--count` of them on
consecutive UDP ports from `--port`, each joined to the ones started before
it, prints where each listens, then ``ready``, and runs until Ctrl-C or
SIGTERM, when it stops every node and exits 0.

Run: python examples/bootstrap.py [--host 127.0.0.1] [--port 8468] [--count 3]

With ``--port 0`` the system picks a free port for each node; the printed
lines tell which.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import p2ptimeline as pt

log = logging.getLogger("bootstrap")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY_LIBRARIES = ("kademlia", "rpcudp")  # what p2ptimeline's DHT is built on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run bootstrap DHT nodes for a p2ptimeline network.",
        epilog="Peers join with: python examples/cli.py --bootstrap HOST:PORT",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (%(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8468,
        help="UDP port of the first node; the others take the next ones "
        "(%(default)s; 0: let the system pick free ports)",
    )
    parser.add_argument(
        "--count", type=int, default=3, help="number of nodes (%(default)s)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe log lines shown, on stderr (%(default)s; the "
        "kademlia and rpcudp libraries' lines only from WARNING up, or at "
        "DEBUG)",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.port < 0 or args.port + args.count - 1 > 65535:
        parser.error("the ports must lie between 0 and 65535")
    return args


async def run(host: str, port: int, count: int) -> int:
    """Start the nodes, wait for a stop signal, stop them; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    nodes: list[pt.DhtRegistry] = []
    try:
        for i in range(count):
            known = [n.address for n in nodes]
            node = pt.DhtRegistry(host, port + i if port else 0, known)
            try:
                await node.start()
            except pt.P2PTimelineError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            nodes.append(node)
            node_host, node_port = node.address
            print(f"node {i + 1}/{count} listening on {node_host}:{node_port} (UDP)")
        print("ready", flush=True)
        await stop.wait()
        log.info("stopping %d node(s)", len(nodes))
        return 0
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def configure_logging(level: str) -> None:
    """Log lines on stderr from `level` up, but those of the libraries under
    the DHT (`CHATTY_LIBRARIES`) from WARNING up unless `level` is DEBUG.

    Their INFO lines narrate the protocol's inner steps, and some read as
    trouble when there is none: kademlia's ``creating spider with peers:
    []`` said that the first node had nobody to join yet, as it should.
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
    return asyncio.run(run(args.host, args.port, args.count))


if __name__ == "__main__":
    sys.exit(main())
