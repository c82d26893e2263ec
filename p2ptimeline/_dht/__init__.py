"""The DHT wing: the registry of users on a Kademlia DHT.

Pure: `records` (values, keys, the storage and reading rules), `wire`
(datagrams checked into types), `storage`, `routing`, `names`. I/O:
`protocol` (UDP), `lookup`, `node`, `follow_sets`, `registry`
(`DhtRegistry`, the public face).
"""
