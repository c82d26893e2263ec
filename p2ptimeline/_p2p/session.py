"""The session: accounts, logging in and out, following, and what the
logged-in user learns from others (follow notices, followers' presence).

Logging in publishes the user's presence, collects the follows and unfollows
that happened while away, tells online followees where the user is (so their
posts flow at once) and starts the session's periodic jobs: pulling from
followees, re-reading the followers (a follow notice is sent once; the
registry holds every entry) and the retention policy. They end with the
session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable

from .._errors import (
    AuthError,
    InvalidRecord,
    NetworkError,
    ProtocolError,
    RegistryUnavailable,
    RemoteError,
    UnknownUser,
    UsageError,
)
from .._identity import Identity, check_password
from .._models import MAX_USERNAME_CHARS, FollowEntry, check_username
from .._store import StoredIdentity
from .._tasks import bounded, every
from .context import Notification, PeerContext, Session
from .directory import FollowerDirectory
from .pull import Puller
from .wire import Ack, FollowNotice, Message, PresenceNotice

__all__ = ["Sessions", "check_name"]

log = logging.getLogger("p2ptimeline.peer")


class Sessions:
    """Accounts and the logged-in user's session on one peer."""

    def __init__(self, context: PeerContext, puller: Puller) -> None:
        self._context = context
        self._puller = puller

    # Accounts

    async def register(self, username: str, password: str, publish_key: bool) -> None:
        """See `Peer.register`."""
        context = self._context
        self._check_logged_out()
        check_name(username)
        check_password(password, username)
        identity = Identity.generate()
        sealed = await asyncio.to_thread(
            identity.seal, password, cost=context.config.seal_cost
        )
        published = sealed if publish_key else b""
        await context.registry.claim_username(username, identity, published)
        await context.store.save_identity(
            StoredIdentity(
                username=username, public_key=identity.public_key, sealed_key=sealed
            )
        )
        await self._begin(username, identity)

    async def login(self, username: str, password: str) -> None:
        """See `Peer.login`."""
        context = self._context
        self._check_logged_out()
        check_name(username)
        record = await context.registry.get_user(username)
        if record is None:
            raise UnknownUser(f"no user {username!r}")
        blob = record.sealed_key
        if not blob:
            stored = await context.store.load_identity(username)
            if stored is None or stored.public_key != record.public_key:
                raise AuthError(
                    f"{username!r} does not publish a sealed key: log in on a "
                    "peer that holds it (where the user registered)"
                )
            blob = stored.sealed_key
        identity = await _unseal(blob, password)
        if identity.public_key != record.public_key:
            raise AuthError("the sealed key does not match the registered key")
        if record.sealed_key:
            await context.store.save_identity(
                StoredIdentity(
                    username=username,
                    public_key=record.public_key,
                    sealed_key=record.sealed_key,
                )
            )
        await self._begin(username, identity)

    async def change_password(self, old: str, new: str) -> None:
        """See `Peer.change_password`."""
        context = self._context
        session = context.require_session()
        username, identity = session.username, session.identity
        check_password(new, username)
        stored = await context.store.load_identity(username)
        if stored is None or stored.public_key != identity.public_key:
            raise AuthError(f"this peer's store holds no sealed key of {username!r}")
        try:
            await _unseal(stored.sealed_key, old)
        except AuthError as exc:
            raise AuthError("the current password is wrong") from exc
        record = await context.registry.get_user(username)
        if record is None:
            raise UnknownUser(f"the registry lost the claim of {username!r}")
        sealed = await asyncio.to_thread(
            identity.seal, new, cost=context.config.seal_cost
        )
        if record.sealed_key:  # published: publish the new one instead
            await context.registry.claim_username(username, identity, sealed)
        await context.store.save_identity(
            StoredIdentity(
                username=username, public_key=identity.public_key, sealed_key=sealed
            )
        )

    # The session

    async def _begin(self, username: str, identity: Identity) -> None:
        context = self._context
        registry = context.registry
        following, entries = await asyncio.gather(
            registry.get_following(username),
            registry.get_follow_entries(username, "followers"),
        )
        session = Session(
            username=username,
            identity=identity,
            following=set(following),
            directory=FollowerDirectory(),
            notifications=[],
        )
        known = await context.store.load_relation(username, "followers")
        for entry in sorted(entries, key=lambda e: e.timestamp):
            session.directory.apply(entry)
            if entry.following and entry.follower not in known:
                session.notifications.append(Notification.of("follow", entry))
            elif not entry.following and entry.follower in known:
                session.notifications.append(Notification.of("unfollow", entry))
        await context.store.save_relation(username, "following", following)
        await context.store.save_relation(
            username, "followers", session.directory.names()
        )
        context.session = session
        try:
            await registry.set_presence(
                username, identity, context.address, online=True
            )
        except BaseException:
            await self.end()
            raise
        await self.apply_retention()
        config, ratelog = context.config, context.ratelog
        session.tasks.spawn(self._announce(session))
        for interval, job in (
            (config.pull_interval, self.sync),
            (config.pull_interval, self.reread_followers),
            (config.retention_interval, self.apply_retention),
        ):
            session.tasks.spawn(every(interval, job, ratelog))
        await self.sync()

    async def end(self) -> None:
        """End the session (if any) and its tasks, without telling anyone."""
        context = self._context
        session, context.session = context.session, None
        if session is not None:
            await session.tasks.close()

    async def logout(self) -> None:
        """See `Peer.logout`."""
        context = self._context
        session = context.require_session()
        await self.end()
        await context.store.save_relation(
            session.username, "followers", session.directory.names()
        )
        try:
            await context.registry.set_presence(
                session.username, session.identity, context.address, online=False
            )
        except RegistryUnavailable as exc:
            log.warning("could not publish the logout: %s", exc)

    async def sync(self) -> int:
        """Pull from every followee now; how many posts were new."""
        return await self._puller.sync(self._context.require_session())

    async def apply_retention(self) -> None:
        """Remove posts older than `PeerConfig.retention` (not the user's own,
        if `keep_own_posts`)."""
        context = self._context
        session, retention = context.session, context.config.retention
        if retention is None or session is None:
            return
        cutoff = context.clock.now_ms() - int(retention * 1000)
        keep = {session.username} if context.config.keep_own_posts else set()
        deleted = await context.store.prune(older_than_ms=cutoff, keep_authors=keep)
        if deleted:
            log.info("retention removed %d posts", deleted)

    def _check_logged_out(self) -> None:
        session = self._context.session
        if session is not None:
            raise UsageError(f"{session.username} is logged in: log out first")

    # Following

    async def follow(self, username: str) -> None:
        """See `Peer.follow`."""
        context = self._context
        session = context.require_session()
        check_name(username)
        if username == session.username:
            raise UsageError("a user cannot follow themselves")
        entry = await context.registry.follow(
            session.username, username, session.identity
        )
        session.following.add(username)
        await context.store.save_relation(
            session.username, "following", session.following
        )
        await self._notify_followee(session, entry)
        catch_up = session.tasks.spawn(self._puller.pull(username))
        await asyncio.wait([catch_up], timeout=context.config.follow_catch_up)

    async def unfollow(self, username: str) -> None:
        """See `Peer.unfollow`."""
        context = self._context
        session = context.require_session()
        check_name(username)
        if username == session.username:
            raise UsageError("a user cannot unfollow themselves")
        if username not in session.following:
            raise UsageError(f"{session.username} does not follow {username}")
        entry = await context.registry.unfollow(
            session.username, username, session.identity
        )
        session.following.discard(username)
        await context.store.save_relation(
            session.username, "following", session.following
        )
        await self._notify_followee(session, entry)

    async def _notify_followee(self, session: Session, entry: FollowEntry) -> None:
        """Tell the followee now, if it is online (it learns at login otherwise)."""
        context = self._context
        followee = entry.followee
        presence = await context.own_presence(session)
        notice = FollowNotice(entry=entry, presence=presence)
        try:
            address = await context.online_address(followee)
            if address is not None:
                await context.request(address, notice)
        except (NetworkError, RemoteError) as exc:
            log.info("could not tell %s about the follow: %s", followee, exc)

    async def suggestions(self, limit: int) -> list[str]:
        """See `Peer.suggestions`."""
        context = self._context
        session = context.require_session()
        counts: collections.Counter[str] = collections.Counter()
        excluded = session.following | {session.username}

        async def tally(followee: str) -> None:
            try:
                names = await context.registry.get_following(followee)
            except (UnknownUser, RegistryUnavailable) as exc:
                log.info("no suggestions from %s: %s", followee, exc)
                return
            counts.update(names - excluded)

        await bounded(tally, sorted(session.following))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return [name for name, _ in ranked[: max(limit, 0)]]

    # What others tell the user

    async def on_follow_notice(self, notice: FollowNotice) -> Message:
        """Take a follower's notice that it follows (or no longer follows)
        the user, checked against the follower's registered key."""
        context = self._context
        session = context.session
        entry = notice.entry
        if session is None or entry.followee != session.username:
            raise ProtocolError("this peer's user is not the followee")
        if entry.followee_key != session.identity.public_key:
            raise InvalidRecord("follow entry for another key")
        entry.verify()
        if await context.public_key(entry.follower) != entry.follower_key:
            raise InvalidRecord(f"entry not signed by {entry.follower}")
        await self._take_follow_entries(session, [entry])
        if entry.following and notice.presence is not None:
            notice.presence.verify()
            session.directory.update_presence(entry.follower, notice.presence)
        return Ack()

    async def on_presence_notice(self, notice: PresenceNotice) -> Message:
        """Take a follower's notice of where it is online now."""
        context = self._context
        session = context.session
        if session is None:
            return Ack()
        presence = notice.presence
        presence.verify()
        if await context.public_key(notice.username) != presence.public_key:
            raise InvalidRecord(f"presence not signed by {notice.username}")
        session.directory.update_presence(notice.username, presence)
        return Ack()

    async def reread_followers(self) -> None:
        """Take in follows and unfollows whose notice never arrived."""
        context = self._context
        session = context.require_session()
        entries = await context.registry.get_follow_entries(
            session.username, "followers"
        )
        await self._take_follow_entries(session, entries)

    async def _take_follow_entries(
        self, session: Session, entries: Iterable[FollowEntry]
    ) -> None:
        """Apply verified follow entries of the user's followers, oldest
        first; note each change, and save the followers if any changed."""
        changed = False
        for entry in sorted(entries, key=lambda e: e.timestamp):
            change = session.directory.apply(entry)
            if change is not None:
                session.notifications.append(Notification.of(change, entry))
                changed = True
        if changed:
            await self._context.store.save_relation(
                session.username, "followers", session.directory.names()
            )

    async def _announce(self, session: Session) -> None:
        """Tell online followees where this user is now, so posts flow at once."""
        context = self._context
        presence = await context.own_presence(session)
        if presence is None:
            return
        notice = PresenceNotice(username=session.username, presence=presence)

        async def tell(followee: str) -> None:
            try:
                address = await context.online_address(followee)
                if address is not None:
                    await context.request(address, notice)
            except (NetworkError, RemoteError, UnknownUser) as exc:
                log.debug("could not announce to %s: %s", followee, exc)

        await bounded(tell, sorted(session.following))


async def _unseal(blob: bytes, password: str) -> Identity:
    """Open a sealed key (in a thread: it is slow on purpose).

    Raises:
        AuthError: Wrong password, or a blob that cannot be opened.
    """
    try:
        return await asyncio.to_thread(Identity.unseal, blob, password)
    except AuthError:
        raise
    except RemoteError as exc:
        raise AuthError(f"the sealed key cannot be opened: {exc}") from exc


def check_name(username: str) -> None:
    """Refuse `username` with a `UsageError` that says the rule, unless valid."""
    if check_username(username):
        return
    shown = repr(username)
    if len(shown) > 40:
        shown = f"{shown[:36]}..."
    if isinstance(username, str) and check_username(username.lower()):
        shown += " (usernames are lowercase)"
    raise UsageError(
        f"invalid username {shown}: a username is 1 to "
        f"{MAX_USERNAME_CHARS} characters of a-z, 0-9, '_', '.' and '-', "
        "not starting with '.' or '-'"
    )
