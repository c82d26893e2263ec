"""A kit of hostile network participants, for tests and `benchmarks/attacks.py`.

Each module plays one kind of attacker against real peers on loopback, and
speaks the wire formats directly (rpcudp datagrams, length-prefixed frames),
so that what it sends is exactly what a hostile program could send:

* `hostile.tcp`: a peer-protocol client that sends any frame or bytes, and
  can refuse to read its replies; servers that never read, ports whose
  connects hang.
* `hostile.push`: pushes crafted without the library's validators (trees of
  any size, at any addresses), and a count of connection attempts.
* `hostile.dht`: DHT nodes that lie in their answers, a raw client of both
  protocol versions, and sinks that count what invented addresses receive.

The kit imports only the public API of `p2ptimeline` and its wire codec, so
that a benchmark can run it against an older version of the library too.
"""
