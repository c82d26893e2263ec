"""Peer, end to end: the seed's scenarios between real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
from conftest import FAST, PeerFactory

import p2ptimeline as pt
from p2ptimeline._p2p.wire import (
    FollowNotice,
    Frame,
    Message,
    PostBatch,
    PostPush,
    TreeMember,
    encode_frame,
)
from p2ptimeline.testing import NtpServer, crash, eventually


async def holds(peer: pt.Peer, post: pt.Post) -> bool:
    """Whether `post` is in `peer`'s timeline."""
    return any(p.id == post.id for p in await peer.timeline(limit=1000))


async def all_hold(peers: list[pt.Peer], post: pt.Post) -> bool:
    return all(await asyncio.gather(*(holds(p, post) for p in peers)))


async def star_and_fans(
    peers: PeerFactory, fans: int, **options: object
) -> list[pt.Peer]:
    """An author ("star") and `fans` followers, all logged in."""
    net = await peers(fans + 1, **options)
    await net[0].register("star", "correct horse")
    for i, fan in enumerate(net[1:]):
        await fan.register(f"fan{i}", "correct horse")
        await fan.follow("star")
    return net


class Wiretap(pt.Transport):
    """A peer's transport that records the pushes it sends, and can be told
    to fail some requests (`fault`) or to answer others' in its place
    (`answering`)."""

    def __init__(self, inner: pt.Transport) -> None:
        super().__init__(inner)
        self.pushed: list[str] = []  # the receivers of every push sent
        self.fault: Callable[[Message], None] | None = None
        self.answering: Callable[[Message], Awaitable[Message]] | None = None

    async def request(self, address: tuple[str, int], message: Message) -> Message:
        if self.fault is not None:
            self.fault(message)
        if isinstance(message, PostPush):
            self.pushed.append(message.tree[0].name)
        return await super().request(address, message)

    async def answer(self, message: Message, remote: tuple[str, int]) -> Message:
        if self.answering is not None:
            return await self.answering(message)
        return await super().answer(message, remote)


class Taps:
    """`Peer(transport=taps)`: gives each peer made a `Wiretap`, in order."""

    def __init__(self) -> None:
        self.made: list[Wiretap] = []

    def __call__(self, inner: pt.Transport) -> pt.Transport:
        self.made.append(Wiretap(inner))
        return self.made[-1]


async def test_post_reaches_every_online_follower(peers: PeerFactory) -> None:
    """A post reaches all 20 online followers; the author sends at most k frames."""
    taps = Taps()
    star, *fans = await star_and_fans(peers, 20, transport=taps)
    assert await star.followers("star") == sorted(f"fan{i}" for i in range(20))
    sent = taps.made[0].pushed
    sent.clear()
    post = await star.post("hello, followers")
    await eventually(lambda: all_hold(fans, post))
    assert len(sent) <= FAST.fanout
    assert (await fans[7].timeline())[0] == post


async def test_a_subtree_too_large_for_a_frame_is_split(peers: PeerFactory) -> None:
    """When the author's subtrees do not fit in a frame, it sends each child
    the post alone and pushes the children's subtrees itself: every follower
    still gets the post pushed, none is taken for unreachable."""
    taps = Taps()
    star, *fans = await star_and_fans(peers, 20, transport=taps)
    tap = taps.made[0]
    post = await star.post("small enough")
    await eventually(lambda: all_hold(fans, post))
    four = tuple(TreeMember(name=f"fan{i}", host="127.0.0.1", port=1) for i in range(4))
    push = Frame.of(PostPush(post=post, fanout=2, tree=four), request_id=1)
    size = len(encode_frame(pt.CborSerializer(), push)) + 100  # 4 or 5 fit, not 10

    def frame_limit(message: Message) -> None:  # what the pool checks
        encode_frame(pt.CborSerializer(), Frame.of(message, request_id=1), size)

    tap.fault = frame_limit
    tap.pushed.clear()
    post = await star.post("to a tree that does not fit in one frame")
    await eventually(lambda: all_hold(fans, post))
    assert len(tap.pushed) > FAST.fanout  # split: more than k frames from the author
    session = star._context.session
    assert session is not None
    directory = session.directory
    assert [n for n in directory.names() if directory.get(n).unreachable_seq] == []  # type: ignore[union-attr]


async def test_followers_forward_with_the_authors_fanout(peers: PeerFactory) -> None:
    """Peers configured with another fanout than the author's forward its
    tree as planned (the arity travels in each push): the author still sends
    only k frames."""
    taps = Taps()
    (star,) = await peers(1, transport=taps)
    fans = await peers(12, config=attrs.evolve(FAST, fanout=3))
    await star.register("star", "correct horse")
    for i, fan in enumerate(fans):
        await fan.register(f"fan{i}", "correct horse")
        await fan.follow("star")
    sent = taps.made[0].pushed
    post = await star.post("whatever your fanout")
    await eventually(lambda: all_hold(fans, post))
    assert len(sent) == FAST.fanout


async def test_unfollow_stops_delivery(peers: PeerFactory) -> None:
    """After an unfollow, the user gets no more posts of the former followee."""
    star, *fans = await star_and_fans(peers, 20)
    leaver = fans[5]
    await leaver.unfollow("star")
    assert "fan5" not in await star.followers("star")
    post = await star.post("only for followers")
    others = [f for f in fans if f is not leaver]
    await eventually(lambda: all_hold(others, post))
    await leaver.sync()
    assert not await holds(leaver, post)
    assert await leaver.timeline() == []


async def test_offline_follower_catches_up_at_login(peers: PeerFactory) -> None:
    """A follower that was offline during posts has them all after logging in."""
    star, *fans = await star_and_fans(peers, 20)
    away = fans[3]
    await away.logout()
    posts = [await star.post(f"post {i}") for i in range(5)]
    await eventually(lambda: all_hold(fans[4:], posts[-1]))
    await away.login("fan3", "correct horse")
    assert [p.id for p in await away.timeline()] == [p.id for p in reversed(posts)]


async def test_catch_up_pages_fit_in_a_frame(peers: PeerFactory) -> None:
    """Hundreds of posts at the longest text in the widest characters are
    served in pages that fit the frame limit: a pull gets every one."""
    star, fan = await star_and_fans(peers, 1)
    await fan.logout()
    text = "\N{GRINNING FACE}" * pt.MAX_POST_CHARS  # 4 bytes a character
    posts = [await star.post(text) for _ in range(600)]
    await fan.login("fan0", "correct horse")
    held = {p.id for p in await fan.timeline(limit=1000)}
    assert held == {p.id for p in posts}


async def test_posts_of_an_offline_author_come_from_another_follower(
    peers: PeerFactory,
) -> None:
    """With the author offline, a follower that logs in gets its posts elsewhere."""
    star, *fans = await star_and_fans(peers, 20)
    latecomer = fans[0]
    await latecomer.logout()
    post = await star.post("written while you were away")
    await eventually(lambda: all_hold(fans[1:], post))
    await star.logout()
    await latecomer.login("fan0", "correct horse")
    assert await holds(latecomer, post)


async def test_subtree_of_a_crashed_follower_still_receives_the_post(
    peers: PeerFactory,
) -> None:
    """Followers killed before a post (still online by their lease) do not cut
    off their subtrees: their children are re-homed under the sender."""
    chain = attrs.evolve(FAST, fanout=1)  # a chain: every follower forwards
    star, *fans = await star_and_fans(peers, 20, config=chain)
    victims = random.Random(7).sample(fans[:-1], 5)
    for victim in victims:
        await crash(victim)
    post = await star.post("through the gaps")
    alive = [f for f in fans if f not in victims]
    await eventually(lambda: all_hold(alive, post))


async def test_notifications_of_what_happened_while_away(peers: PeerFactory) -> None:
    """Follows and unfollows that happened while away are notified at login."""
    bob, carol, dave, eve, frank, *_ = await peers(20)
    for peer, name in [(bob, "bob"), (carol, "carol"), (dave, "dave")]:
        await peer.register(name, "correct horse")
    await eve.register("eve", "correct horse")
    await frank.register("frank", "correct horse")
    await frank.follow("bob")
    await eventually(lambda: _notified(bob, ("follow", "frank")))
    await bob.logout()
    await carol.follow("bob")
    await dave.follow("bob")
    await eve.follow("bob")
    await eve.unfollow("bob")  # followed and left while bob was away: no news
    await frank.unfollow("bob")
    await bob.login("bob", "correct horse")
    notes = {(n.kind, n.user) for n in await bob.notifications()}
    assert notes == {("follow", "carol"), ("follow", "dave"), ("unfollow", "frank")}


async def _notified(peer: pt.Peer, note: tuple[str, str]) -> bool:
    return note in {(n.kind, n.user) for n in await peer.notifications()}


async def test_online_followee_learns_of_a_follow_at_once(peers: PeerFactory) -> None:
    """An online followee is told of a follow directly, and of an unfollow."""
    alice, bob = await peers(2)
    await alice.register("alice", "correct horse")
    await bob.register("bob", "correct horse")
    await bob.follow("alice")
    assert await _notified(alice, ("follow", "bob"))
    await bob.unfollow("alice")
    assert await _notified(alice, ("unfollow", "bob"))


async def test_a_lost_follow_notice_is_made_up_from_the_registry(
    peers: PeerFactory,
) -> None:
    """A follow whose notice never reached the online followee is read from
    the registry: the followee's next posts are pushed to the new follower."""
    (alice,) = await peers(1, config=attrs.evolve(FAST, pull_interval=0.5))
    taps = Taps()
    (bob,) = await peers(1, transport=taps)
    await alice.register("alice", "correct horse")
    await bob.register("bob", "correct horse")

    def losing_notices(message: Message) -> None:
        if isinstance(message, FollowNotice):
            raise pt.PeerUnreachable("lost on the way")

    taps.made[0].fault = losing_notices
    await bob.follow("alice")
    assert await alice.followers("alice") == ["bob"]  # in the registry
    await eventually(lambda: _notified(alice, ("follow", "bob")))
    stream = bob.incoming()
    post = await alice.post("pushed, not pulled")  # bob pulls hourly
    assert (await asyncio.wait_for(anext(stream), 10)).id == post.id
    await stream.aclose()


async def test_login_on_a_second_peer(peers: PeerFactory) -> None:
    """The same credentials work on a peer that never saw the user; posts flow."""
    home, away, fan = await peers(3)
    await home.register("alice", "correct horse")
    await fan.register("fan", "correct horse")
    await fan.follow("alice")
    await home.logout()
    await away.login("alice", "correct horse")
    post = await away.post("from my other machine")
    await eventually(lambda: holds(fan, post))
    assert await away.following("fan") == ["alice"]


async def test_wrong_password_and_unknown_user(peers: PeerFactory) -> None:
    """A wrong password is AuthError; an unknown name is UnknownUser."""
    home, other = await peers(2)
    await home.register("alice", "right password")
    await home.logout()
    with pytest.raises(pt.AuthError):
        await other.login("alice", "wrong")
    with pytest.raises(pt.AuthError):
        await home.login("alice", "wrong")
    with pytest.raises(pt.UnknownUser):
        await other.login("nobody", "correct horse")
    with pytest.raises(pt.UsernameTaken):
        await other.register("alice", "correct horse")
    await other.login("alice", "right password")
    assert other.username == "alice"


async def test_operations_need_a_login(peers: PeerFactory) -> None:
    """Operations of a user raise NotLoggedIn without one; bad input is UsageError."""
    (peer,) = await peers(1)
    for call in (
        peer.post("x"),
        peer.follow("bob"),
        peer.unfollow("bob"),
        peer.timeline(),
        peer.notifications(),
        peer.suggestions(),
        peer.sync(),
        peer.logout(),
    ):
        with pytest.raises(pt.NotLoggedIn):
            await call
    await peer.register("alice", "correct horse")
    with pytest.raises(pt.UsageError):
        await peer.post("x" * (pt.MAX_POST_CHARS + 1))
    with pytest.raises(pt.UsageError):
        await peer.follow("alice")
    with pytest.raises(pt.UnknownUser):
        await peer.follow("nobody")
    with pytest.raises(pt.UsageError):
        await peer.register("bob", "correct horse")


async def test_forged_and_tampered_posts_are_never_stored(peers: PeerFactory) -> None:
    """Pushed or pulled posts that fail verification are refused and not stored."""
    taps = Taps()
    star, fan = await peers(2)
    (mallory,) = await peers(1, transport=taps)
    await star.register("star", "correct horse")
    await fan.register("fan", "correct horse")
    await mallory.register("mallory", "correct horse")
    await fan.follow("star")
    genuine = await star.post("genuine")
    await eventually(lambda: holds(fan, genuine))
    assert mallory._context.session is not None
    forged = pt.Post.create(
        mallory._context.session.identity, "star", "I am star", genuine.timestamp
    )
    tampered = attrs.evolve(genuine, text="tampered")
    me = TreeMember(name="fan", host="127.0.0.1", port=fan.port)
    for bad in (forged, tampered):
        with pytest.raises(pt.Refused):
            await taps.made[0].request(
                fan.address, PostPush(post=bad, fanout=2, tree=(me,))
            )
    # A source that lies when asked for posts: mallory answers GetPosts.
    late = await peers(1)
    await late[0].register("late", "correct horse")
    await late[0].follow("star")  # pulls the real posts
    await late[0].logout()

    async def lying(message: Message) -> Message:
        return PostBatch(posts=(forged, tampered), more=False)

    taps.made[0].answering = lying
    await star.logout()
    await fan.logout()
    await mallory.follow("star")  # now mallory is a source of star's posts
    await late[0].login("late", "correct horse")
    texts = [p.text for p in await late[0].timeline()]
    assert "I am star" not in texts
    assert "tampered" not in texts


async def test_skewed_clock_is_corrected_by_ntp(peers: PeerFactory) -> None:
    """A peer whose clock is 10 minutes slow still orders its posts right, via NTP."""
    async with NtpServer(skew=0.0) as ntp:
        slow_clock = pt.ClockSync([ntp.address], time_source=lambda: time.time() - 600)
        (slow,) = await peers(1, clock=slow_clock)
        await slow_clock.sync()
        fast, reader = await peers(2)
        await slow.register("slow", "correct horse")
        await fast.register("fast", "correct horse")
        await reader.register("reader", "correct horse")
        await reader.follow("slow")
        await reader.follow("fast")
        first = await fast.post("first")
        await eventually(lambda: holds(reader, first))
        second = await slow.post("second, from the slow clock")
        await eventually(lambda: holds(reader, second))
        assert [p.text for p in await reader.timeline()] == [second.text, first.text]
        assert abs(second.timestamp.physical_ms - time.time() * 1000) < 5000


async def test_restart_on_the_same_data_dir_keeps_everything(
    peers: PeerFactory, tmp_path: Path
) -> None:
    """A peer restarted on its data_dir has its identity, own and cached posts."""
    (star,) = await peers(1)
    await star.register("star", "correct horse")
    star_post = await star.post("cached elsewhere")
    (fan,) = await peers(1, data_dir=tmp_path / "fan")
    await fan.register("fan", "correct horse")
    await fan.follow("star")
    await eventually(lambda: holds(fan, star_post))
    own = await fan.post("my own")
    node_id = fan.registry.node_id
    await fan.stop()
    await star.logout()  # the author is gone: the cache must be local
    (again,) = await peers(1, data_dir=tmp_path / "fan")
    await again.login("fan", "correct horse")
    assert {p.id for p in await again.timeline()} == {own.id, star_post.id}
    assert again.registry.node_id == node_id  # the same DHT node, a new port


async def test_incoming_streams_posts_as_they_arrive(peers: PeerFactory) -> None:
    """incoming() yields posts pushed by followees, in arrival order."""
    star, fan = await star_and_fans(peers, 1)
    stream = fan.incoming()  # subscribed from here on
    post = await star.post("live")
    assert (await asyncio.wait_for(anext(stream), 10)).id == post.id
    await stream.aclose()


async def test_suggestions_are_friends_of_friends(peers: PeerFactory) -> None:
    """Suggestions rank by how many followees follow them; never self or followed."""
    net = await peers(6)
    names = ["me", "a", "b", "c", "d", "e"]
    for peer, name in zip(net, names, strict=True):
        await peer.register(name, "correct horse")
    me, a, b, *_ = net
    await me.follow("a")
    await me.follow("b")
    await a.follow("c")
    await a.follow("d")
    await a.follow("me")
    await b.follow("d")
    await b.follow("a")
    assert await me.suggestions() == ["d", "c"]
    assert await me.suggestions(limit=1) == ["d"]


async def test_retention_drops_old_posts_but_keeps_own(peers: PeerFactory) -> None:
    """The retention policy removes others' old posts at login, keeping one's own."""
    short = attrs.evolve(FAST, retention=1.0)
    star, fan = await peers(2, config=short)
    await star.register("star", "correct horse")
    await fan.register("fan", "correct horse")
    await fan.follow("star")
    old = await star.post("soon too old")
    await eventually(lambda: holds(fan, old))
    mine = await fan.post("mine")
    await fan.logout()
    await star.logout()
    await asyncio.sleep(1.1)  # let the posts age past the retention period
    await fan.login("fan", "correct horse")
    assert [p.id for p in await fan.timeline()] == [mine.id]


async def test_stop_is_idempotent_and_frees_the_port(peers: PeerFactory) -> None:
    """stop() twice is fine, and frees both the UDP and the TCP port."""
    import socket

    (peer,) = await peers(1)
    await peer.register("alice", "correct horse")
    port = peer.port
    await peer.stop()
    await peer.stop()
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", port))


async def test_a_peer_on_every_interface_is_reached_at_its_advertised_host(
    peers: PeerFactory,
) -> None:
    """A peer listening on 0.0.0.0 publishes its advertised host, and posts
    flow both ways; listening on every interface without one is refused."""
    (bob,) = await peers(1)
    alice = pt.Peer(
        "0.0.0.0",
        0,
        [bob.address],
        advertised_host="127.0.0.1",
        config=FAST,
        clock=pt.ClockSync(servers=[]),
    )
    async with alice:
        assert alice.address == ("127.0.0.1", alice.port)
        await alice.register("alice", "correct horse")
        await bob.register("bob", "correct horse")
        await bob.follow("alice")
        await alice.follow("bob")
        record = await bob.registry.get_user("alice")
        assert record is not None
        assert record.address == ("127.0.0.1", alice.port)
        hers = await alice.post("from every interface")
        await eventually(lambda: holds(bob, hers))
        his = await bob.post("to every interface")
        await eventually(lambda: holds(alice, his))
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(pt.UsageError, match="needs an advertised host"):
            pt.Peer(wildcard, 0)


async def test_a_silent_follower_delays_only_its_own_subtree(
    peers: PeerFactory,
) -> None:
    """A follower that accepts connections but never answers is skipped after
    its timeouts; everyone else, its subtree included, still gets the post."""
    quick = attrs.evolve(FAST, fanout=1, limits=pt.Limits(request_timeout=0.3))
    taps = Taps()
    star, *fans = await star_and_fans(peers, 20, config=quick, transport=taps)
    silent = fans[4]
    never = asyncio.Event()

    async def mute(message: Message) -> Message:
        await never.wait()
        raise AssertionError("unreachable")

    taps.made[5].answering = mute
    post = await star.post("around the silent one")
    others = [f for f in fans if f is not silent]
    await eventually(lambda: all_hold(others, post), within=20)


async def test_a_crashed_peer_reads_offline_then_catches_up(
    peers: PeerFactory,
) -> None:
    """A killed peer is seen offline once its lease lapses; when its user comes
    back (on a new peer), it catches up on what it missed."""
    short = attrs.evolve(FAST, lease=1.0)
    star, fan = await star_and_fans(peers, 1, config=short)
    await crash(fan)

    async def offline() -> bool:
        record = await star.registry.get_user("fan0")
        return record is not None and not record.online

    await eventually(offline, within=10)
    missed = await star.post("while you were dead")
    (back,) = await peers(1, config=short)
    await back.login("fan0", "correct horse")
    assert [p.id for p in await back.timeline()] == [missed.id]


async def test_posts_stamped_far_in_the_future_are_refused(peers: PeerFactory) -> None:
    """A genuine post stamped beyond max_future is not stored (timeline pinning)."""
    taps = Taps()
    star, fan = await star_and_fans(peers, 1, transport=taps)
    session = star._context.session
    assert session is not None
    ahead = int((time.time() + FAST.max_future + 60) * 1000)
    future = pt.Post.create(
        session.identity, "star", "pinned", pt.HybridTimestamp(physical_ms=ahead)
    )
    me = TreeMember(name="fan0", host="127.0.0.1", port=fan.port)
    await taps.made[0].request(fan.address, PostPush(post=future, fanout=2, tree=(me,)))
    now = await star.post("on time")
    await eventually(lambda: holds(fan, now))
    assert not await holds(fan, future)


async def test_timeline_limits(peers: PeerFactory, tmp_path: Path) -> None:
    """limit 0 gives [], a negative one is UsageError, a huge one all (both stores)."""
    memory, sqlite = await peers(1) + await peers(1, data_dir=tmp_path / "peer")
    for peer, name in [(memory, "alice"), (sqlite, "bob")]:
        await peer.register(name, "correct horse")
        posts = [await peer.post(f"post {i}") for i in range(3)]
        assert await peer.timeline(limit=0) == []
        with pytest.raises(pt.UsageError, match="0 or more"):
            await peer.timeline(limit=-1)
        huge = await peer.timeline(limit=99999999999999999999)
        assert [p.id for p in huge] == [p.id for p in reversed(posts)]
        assert len(await peer.timeline(limit=2)) == 2


async def test_invalid_usernames_are_refused_with_the_rule(peers: PeerFactory) -> None:
    """register, login, follow and unfollow of an invalid name say the rule."""
    (peer,) = await peers(1)
    rule = r"1 to 32 characters of a-z, 0-9, '_', '\.' and '-', not starting with"
    with pytest.raises(
        pt.UsageError, match=rf"'Bob' \(usernames are lowercase\): .*{rule}"
    ):
        await peer.register("Bob", "correct horse")
    with pytest.raises(pt.UsageError, match=rf"'\.bob': a username is {rule}"):
        await peer.login(".bob", "correct horse")
    await peer.register("alice", "correct horse")
    for call in (peer.follow, peer.unfollow):
        with pytest.raises(
            pt.UsageError, match=rf"'Bob' \(usernames are lowercase\).*{rule}"
        ):
            await call("Bob")
    with pytest.raises(pt.UsageError, match=rf"'x{{35}}\.\.\.: .*{rule}"):
        await peer.follow("x" * 1000)


async def test_post_text_must_be_neither_empty_nor_too_long(peers: PeerFactory) -> None:
    """post() refuses empty, whitespace-only and over-long texts, saying why."""
    (peer,) = await peers(1)
    await peer.register("alice", "correct horse")
    for text, reason in [("", "empty"), (" \n\t ", "only whitespace")]:
        with pytest.raises(
            pt.UsageError, match=f"needs some text: this one is {reason}"
        ):
            await peer.post(text)
    with pytest.raises(pt.UsageError) as refused:
        await peer.post("x" * 1200)
    assert (
        str(refused.value) == "a post is at most 1,000 characters; this one has 1,200"
    )
    longest = await peer.post("x" * pt.MAX_POST_CHARS)
    assert [p.id for p in await peer.timeline()] == [longest.id]


async def test_no_source_to_pull_from_is_not_a_warning(
    peers: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An offline followee with no online follower is an INFO line, not a WARNING."""
    alice, bob = await peers(2)
    await alice.register("alice", "correct horse")
    await bob.register("bob", "correct horse")
    await bob.follow("alice")
    await alice.logout()
    caplog.set_level(logging.INFO, logger="p2ptimeline")
    assert await bob.sync() == 0
    lines = [r for r in caplog.records if "no online source of alice" in r.message]
    assert lines
    assert {r.levelno for r in lines} == {logging.INFO}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
