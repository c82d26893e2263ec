"""The peer wing: posts travel peer to peer over TCP.

Pure: `wire` (frames), `tree` (dissemination trees, relays), `directory`
(an author's followers). I/O: `connection` (pool and server), and the
peer's jobs, composed by `peer` (`Peer`, the public face).
"""
