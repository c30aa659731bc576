"""
The delivery rules, in one place: send, pending, ack, rooms and typing.

The WebSocket consumer and the HTTP API parse and call these; neither holds a delivery rule.
Store, then send: a message and one delivery per target client are committed in one
transaction, and connected tabs are poked through the channel layer only after the commit.
"""

import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from clients.errors import Conflict, Forbidden, NotFound, RateLimited
from clients.models import Client, client_group, user_group
from clients.push import channel_send_after_commit, group_send_after_commit, group_send_now
from clients.services import AnyUser, get_own_client, lock_user, require_user, touch
from messaging import batching, conf, metrics, validation
from messaging.models import Delivery, Message, Room
from messaging.ratelimit import send_rate
from messaging.wire import message_tail

logger = logging.getLogger(__name__)

RESYNC = {"type": "messaging.resync"}


@dataclass(frozen=True)
class SendResult:
    """
    The stored message's id, and whether this send was a retry of an already stored one.
    """

    id: int
    duplicate: bool


@dataclass(frozen=True)
class Pending:
    """
    A page of a client's queue: (seq, message id, wire tail) rows, the head, the resync flag.
    """

    rows: list[tuple[int, int, str]]
    head: int
    resync_required: bool


def _uuid_param(value: uuid.UUID | str) -> Any:
    # A client id as this database stores it (SQLite: 32 hex digits; PostgreSQL: uuid).
    return Client._meta.pk.get_db_prep_value(  # type: ignore[union-attr]
        value if isinstance(value, uuid.UUID) else uuid.UUID(value), connection
    )


@dataclass(frozen=True)
class SendRequest:
    """
    One validated send of an authorized client, waiting to be stored (see send_many).
    """

    owner: Any
    client_id: uuid.UUID
    client_msg_id: str
    kind: str  # "room" or "user"
    name: str
    body_text: str
    # A publish of the server (messaging.publishing): its sender label. Then `owner` is None,
    # `client_id` is SERVER_CLIENT and `client_msg_id` the publish key; it is not rate limited,
    # and it reaches every target client but no sender's.
    server: str | None = None


def send_message(
    user: AnyUser | None, client_id: object, client_msg_id: object, to: object, body: object
) -> SendResult:
    """
    Store a message with one delivery per target client (every client of every recipient and
    of the sender), or return the stored one if this `client_msg_id` was seen from this client.
    """
    owner, *send = _validated(user, client_msg_id, to, body)
    sender_client = get_own_client(owner, client_id)
    touch(sender_client)
    (result,) = send_many([SendRequest(owner, sender_client.pk, *send)])
    if isinstance(result, Exception):
        raise result
    return result


def send_request(
    user: AnyUser | None, client_id: uuid.UUID, client_msg_id: object, to: object, body: object
) -> SendRequest:
    """
    A send frame of a socket's client, validated for send_many; the client was authorized when
    the socket attached (one deleted since then is refused inside the send's transaction).
    """
    owner, *send = _validated(user, client_msg_id, to, body)
    return SendRequest(owner, client_id, *send)


def _validated(user: AnyUser | None, client_msg_id: object, to: object, body: object) -> tuple:
    # (owner, client_msg_id, target kind, target name, body JSON), in the order errors win.
    owner = require_user(user)
    cmid = validation.client_msg_id(client_msg_id)
    kind, name = validation.target(to)
    return owner, cmid, kind, name, validation.body_json(body)


@metrics.sends_counted
def send_many(requests: list[SendRequest]) -> list[SendResult | Exception]:
    """
    Store several sends, each as send_message would (a result, or the error it gets, in order).

    Sends to one target (a room; a user, from one sender) go in one transaction: the room and
    its clients are locked once, the messages inserted in order and their deliveries in one
    statement. Under load, the statements of one send were each a wait for the interpreter's
    lock (the event loop held it), and SQLite has one writer: a send's transaction took 15-20 ms
    at 200 tabs, and the sends behind it waited for it.
    """
    results: list[SendResult | Exception | None] = [None] * len(requests)
    existing = _existing_ids(requests)
    firsts: dict[tuple[uuid.UUID, str], int] = {}  # new sends: their first copy in the batch
    for i, request in enumerate(requests):
        found = existing.get((_uuid_param(request.client_id), request.client_msg_id))
        if found is not None:
            # A retry of a stored message: answered, never rate limited.
            results[i] = SendResult(found, duplicate=True)
        else:
            firsts.setdefault((request.client_id, request.client_msg_id), i)
    # One token per new send from its client's bucket and its user's (messaging.ratelimit),
    # for the whole batch at once. The server's publishes are the host application's to pace.
    limited = {k: i for k, i in firsts.items() if requests[i].server is None}
    taken = {i: True for i in firsts.values()}
    taken.update(
        zip(
            limited.values(),
            send_rate.take_many([(k[0], requests[i].owner.pk) for k, i in limited.items()]),
            strict=True,
        )
    )
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        if results[i] is not None:
            continue
        # A second copy in this batch (a retry) shares its first copy's fate and takes no
        # token: stored as a duplicate of it, or refused with it.
        if taken[firsts[(request.client_id, request.client_msg_id)]]:
            groups.setdefault(_target_key(request), []).append(i)
        else:
            results[i] = RateLimited("too many messages; slow down and retry", code="rate_limited")
    for indexes in groups.values():
        batch = [requests[i] for i in indexes]
        # Within a transaction of the caller (a publish in the host application's atomic block)
        # the sends join it, and not the process's writer lock: on SQLite that transaction may
        # hold the database's write lock already, and a batch holding the process lock would
        # wait for it while it waits for the batch.
        writer = contextlib.nullcontext() if connection.in_atomic_block else batching.one_writer()
        try:
            with writer, transaction.atomic():
                stored = _store(batch)
        except Exception as exc:
            stored = [exc] * len(batch)
        for i, result in zip(indexes, stored, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _target_key(request: SendRequest) -> tuple:
    # Sends with one key share a transaction: a room's, or a user's from one sender.
    if request.kind == "room":
        return ("room", request.name)
    return ("user", request.name, None if request.owner is None else request.owner.pk)


def _existing_ids(requests: list[SendRequest]) -> dict[tuple[Any, str], int]:
    # The stored messages among these sends: {(client key, client_msg_id): message id}.
    keys = sorted({_uuid_param(r.client_id) for r in requests})
    cmids = sorted({r.client_msg_id for r in requests})
    statement = _statements()["existing"].replace("@", ", ".join(["%s"] * len(keys)), 1)
    with connection.cursor() as cursor:
        cursor.execute(_with_list(statement, len(cmids)), [*keys, *cmids])
        return {(client, cmid): message_id for client, cmid, message_id in cursor.fetchall()}


def _store(batch: list[SendRequest]) -> list[SendResult | Exception]:
    # The hot path of the server, in hand-written statements: the ORM's query building and
    # per-value conversions of hundreds of client ids cost more than the database work. Every
    # send of the batch has one target.
    sql = _statements()
    results: list[SendResult | Exception | None] = [None] * len(batch)
    first = batch[0]
    room_id = to_user_id = None
    with connection.cursor() as cursor:
        if first.kind == "room":
            # Locking the room row first gives every send to one room a single order, in
            # history (message ids) and in every member client's seqs alike.
            # (The server's publishes have no owner: NULL matches no member.)
            owners = sorted({r.owner.pk for r in batch if r.owner is not None}) or [None]
            cursor.execute(_with_list(sql["room"], len(owners)), [*owners, first.name])
            rows = cursor.fetchall()
            if not rows:
                return [NotFound(f"no room named {first.name!r}", code="unknown_room")] * len(batch)
            room_id, room_name = rows[0][0], rows[0][1]
            members = {row[2] for row in rows}
            for i, request in enumerate(batch):
                if request.server is None and request.owner.pk not in members:
                    # Before the member clients are locked: a non-member cannot stall the room.
                    results[i] = Forbidden(
                        "only members can post to this room", code="not_a_member"
                    )
            if all(results):
                return results  # type: ignore[return-value]
            to = {"room": room_name}
            # Every client of every member, locked in one stable order (no deadlocks between
            # concurrent sends); the deliveries are numbered from the locked heads: gapless,
            # never reused. Ids stay as the database returns them, and go back to it as they are.
            cursor.execute(sql["room_targets"], [room_id])
        else:
            cursor.execute(sql["user"], [first.name])
            recipient = cursor.fetchone()
            if recipient is None:
                return [NotFound(f"no user named {first.name!r}", code="unknown_user")] * len(batch)
            to_user_id = recipient[0]
            # The recipient's clients and the sender's (none for the server's publishes).
            user_ids = sorted({r.owner.pk for r in batch if r.owner is not None} | {to_user_id})
            to = {"user": recipient[1]}
            cursor.execute(_with_list(sql["targets"], len(user_ids)), user_ids)
        targets = cursor.fetchall()
        target_keys = {t[0] for t in targets}

        stored: list[tuple[int, str]] = []  # (message id, wire) of each message inserted
        for i, request in enumerate(batch):
            if results[i] is not None:
                continue
            sender_key = _uuid_param(request.client_id)
            if request.server is None and sender_key not in target_keys:
                results[i] = NotFound("no such client", code="unknown_client")
                continue
            now = timezone.now()
            if request.server is None:
                wire = message_tail(
                    sender=request.owner.get_username(),
                    client_id=str(request.client_id),
                    to=to,
                    body_json=request.body_text,
                    created=now,
                )
            else:
                wire = message_tail(
                    sender=None,
                    client_id=None,
                    to=to,
                    body_json=request.body_text,
                    created=now,
                    server=request.server,
                )
            cursor.execute(
                sql["insert_message"],
                [
                    None if request.owner is None else request.owner.pk,
                    sender_key,
                    request.client_msg_id,
                    to_user_id,
                    room_id,
                    connection.ops.adapt_datetimefield_value(now),
                    wire,
                ],
            )
            inserted = cursor.fetchone()
            if inserted is None:
                # Sent twice in this batch (a retry of a send still waiting): the first is the
                # stored one.
                cursor.execute(_with_list(sql["existing"], 1), [sender_key, request.client_msg_id])
                results[i] = SendResult(cursor.fetchone()[2], duplicate=True)
                continue
            stored.append((inserted[0], wire))
            results[i] = SendResult(inserted[0], duplicate=False)
        if stored:
            _queue(cursor, sql, targets, stored)
    return results  # type: ignore[return-value]


def _queue(cursor: Any, sql: dict[str, str], targets: list[tuple], stored: list[tuple]) -> None:
    # One delivery of each stored message per target client, numbered on from its locked head,
    # up to the queue bound (a client past it gets none of the rest and must resync); then the
    # pokes, once the transaction commits.
    limit = conf.get("MESSAGING_QUEUE_LIMIT")
    k = len(stored)
    takes: dict[int, list[tuple]] = {}  # how many of the messages a client takes: its rows
    overflowing = []
    for target in targets:
        if target[3]:
            continue  # waiting for its resync: nothing is queued for it
        n = min(k, max(0, limit - (target[1] - target[2])))
        if n:
            takes.setdefault(n, []).append(target)
        if n < k:
            overflowing.append(target[0])
    for n, rows in takes.items():
        ids = [t[0] for t in rows]
        values = [v for j, (message_id, _) in enumerate(stored[:n], 1) for v in (j, message_id)]
        statement = sql["queue"].replace("~", ", ".join(["(%s, %s)"] * n))
        if "bump_heads" in sql:
            cursor.execute(_with_list(statement, len(ids)), [*values, *ids])
            cursor.execute(_with_list(sql["bump_heads"], len(ids)), [n, *ids])
        else:  # one statement: heads bumped, queue rows inserted from them
            cursor.execute(_with_list(statement, len(ids)), [n, *ids, n, *values])
    if overflowing:
        cursor.execute(_with_list(sql["overflow"], len(overflowing)), [True, *overflowing])
        logger.warning(
            "queue limit %d reached for %d client(s); they must resync", limit, len(overflowing)
        )
    # Each poke carries its delivery, so a connected tab's consumer need not read it back, and
    # goes straight to the socket's channel read under the row lock (no group lookups). A
    # socket that attaches after this commit reads the delivery from the database itself. In
    # message order, so every socket gets its pokes in seq order.
    channel_send_after_commit(
        (channel, {"type": "messaging.poke", "seq": head + j, "id": message_id, "tail": wire})
        for j, (message_id, wire) in enumerate(stored, 1)
        for n, rows in takes.items()
        if j <= n
        for _, head, _, _, channel in rows
        if channel
    )
    group_send_after_commit((client_group(uuid.UUID(str(cid))), RESYNC) for cid in overflowing)


def _with_list(statement: str, n: int) -> str:
    return statement.replace("@", ", ".join(["%s"] * n))


def pending_for(client_id: uuid.UUID | str, after: int, limit: int) -> Pending:
    """
    Unacked deliveries of an already authorized client with seq > `after`, in seq order.
    """
    state = Client.objects.filter(pk=client_id).values_list("head", "resync_required").first()
    if state is None:
        raise NotFound("no such client", code="unknown_client")
    rows = list(
        Delivery.objects.filter(client_id=client_id, seq__gt=after)
        .order_by("seq")
        .values_list("seq", "message_id", "message__wire")[:limit]
    )
    # A send may commit between the two reads; the head never trails what was read.
    head = max(state[0], rows[-1][0] if rows else 0)
    return Pending(rows=rows, head=head, resync_required=state[1])


def pending(user: AnyUser | None, client_id: object, after: object, limit: object) -> Pending:
    """
    The client's unacked deliveries with seq > `after` (at most `limit`), for its owner.
    """
    client = get_own_client(user, client_id)
    touch(client)
    return pending_for(
        client.pk,
        validation.int_value(after, "after"),
        validation.int_value(limit, "limit", minimum=1),
    )


def head_of(client_id: uuid.UUID | str) -> int:
    """
    The last seq assigned to the client.
    """
    head = Client.objects.filter(pk=client_id).values_list("head", flat=True).first()
    if head is None:
        raise NotFound("no such client", code="unknown_client")
    return head


@metrics.acks_counted()
def ack(user: AnyUser | None, client_id: object, seq: object) -> int:
    """
    Delete the client's deliveries with seq <= `seq` (cumulative and idempotent; an ack above
    the head counts as an ack of the head). Returns the seq acknowledged.
    """
    upto = validation.int_value(seq, "seq")
    with transaction.atomic():
        client = get_own_client(user, client_id, for_update=True)
        upto = min(upto, client.head)
        fields = ["last_seen_at"]
        client.last_seen_at = timezone.now()
        if upto > client.acked_seq:
            Delivery.objects.filter(
                client_id=client.pk, seq__gt=client.acked_seq, seq__lte=upto
            ).delete()
            client.acked_seq = upto
            fields.append("acked_seq")
        if client.resync_required and upto == client.head:
            # The tab acknowledged everything it was sent and reloaded history: queue again.
            client.resync_required = False
            fields.append("resync_required")
        client.save(update_fields=fields)
    return upto


@metrics.acks_counted(per=len)
def ack_many(acks: dict[uuid.UUID, int]) -> None:
    """
    Cumulative acks of several attached clients (client id: seq, already validated) in one
    transaction, each one as `ack` would do it.
    """
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    # Clients in id order, as sends lock them (no deadlock between the two). Each client's
    # UPDATE computes the ack point from its locked row (an ack above the head counts as an
    # ack of the head; a lower one changes nothing) and clears a resync once the head is
    # acked; the DELETE then removes the queue up to that point. Two statements executed per
    # row by the driver, no read back: a SELECT of the rows first, through the ORM, cost more
    # than the writes.
    keys = sorted((_uuid_param(cid), seq) for cid, seq in acks.items())
    with batching.one_writer(), transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(
            _statements()["ack_update"],
            [(seq, seq, seq, now, seq, False, key) for key, seq in keys],
        )
        cursor.executemany(_statements()["ack_delete"], [(key, key) for key, _ in keys])


@functools.cache
def _statements() -> dict[str, str]:
    # The statements written by hand (hot paths), for this process's database. "@" stands for
    # a list of placeholders, filled in per call (_with_list).
    q = connection.ops.quote_name
    delivery, client = q(Delivery._meta.db_table), q(Client._meta.db_table)
    message, room = q(Message._meta.db_table), q(Room._meta.db_table)
    members = q(Room.members.through._meta.db_table)
    users = q(get_user_model()._meta.db_table)
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    targets = (
        f"SELECT {q('id')}, {q('head')}, {q('acked_seq')}, {q('resync_required')},"
        f" {q('channel_name')} FROM {client}"
    )
    statements = {
        "existing": f"SELECT {q('sender_client')}, {q('client_msg_id')}, {q('id')} FROM {message}"
        f" WHERE {q('sender_client')} IN (@) AND {q('client_msg_id')} IN (@)",
        # The room, and which of the senders are its members (a row each; one with NULL if none).
        "room": f"SELECT r.{q('id')}, r.{q('name')}, m.{q('user_id')} FROM {room} r"
        f" LEFT JOIN {members} m ON m.{q('room_id')} = r.{q('id')} AND m.{q('user_id')} IN (@)"
        f" WHERE r.{q('name')} = %s{lock and f'{lock} OF r'}",
        "user": f"SELECT {q('id')}, {q('username')} FROM {users} WHERE {q('username')} = %s",
        "targets": f"{targets} WHERE {q('user_id')} IN (@) ORDER BY {q('id')}{lock}",
        "room_targets": f"{targets} WHERE {q('user_id')} IN (SELECT {q('user_id')} FROM {members}"
        f" WHERE {q('room_id')} = %s) ORDER BY {q('id')}{lock}",
        "insert_message": f"INSERT INTO {message} ({q('sender_id')}, {q('sender_client')},"
        f" {q('client_msg_id')}, {q('to_user_id')}, {q('room_id')}, {q('created_at')},"
        f" {q('wire')}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT ({q('sender_client')}, {q('client_msg_id')}) DO NOTHING RETURNING {q('id')}",
        # The deliveries of n messages ("~": (j, message id) for j = 1..n) to the clients "@",
        # numbered on from their heads; then the heads move by n.
        "queue": f"INSERT INTO {delivery} ({q('client_id')}, {q('seq')}, {q('message_id')})"
        f" SELECT c.{q('id')}, c.{q('head')} + v.column1, v.column2 FROM {client} c,"
        f" (VALUES ~) AS v WHERE c.{q('id')} IN (@)",
        "bump_heads": f"UPDATE {client} SET {q('head')} = {q('head')} + %s WHERE {q('id')} IN (@)",
        "overflow": f"UPDATE {client} SET {q('resync_required')} = %s WHERE {q('id')} IN (@)",
        "ack_update": f"UPDATE {client} SET {q('acked_seq')} = CASE"
        f" WHEN %s <= {q('acked_seq')} THEN {q('acked_seq')}"
        f" WHEN %s < {q('head')} THEN %s ELSE {q('head')} END,"
        f" {q('last_seen_at')} = %s, {q('resync_required')} = CASE"
        f" WHEN %s >= {q('head')} THEN %s ELSE {q('resync_required')} END"
        f" WHERE {q('id')} = %s",
        "ack_delete": f"DELETE FROM {delivery} WHERE {q('client_id')} = %s AND {q('seq')} <="
        f" (SELECT {q('acked_seq')} FROM {client} WHERE {q('id')} = %s)",
    }
    if connection.vendor == "postgresql":
        # One statement: the heads move and the deliveries are numbered from the moved heads
        # (one round trip less while the send holds its locks).
        del statements["bump_heads"]
        statements["queue"] = (
            f"WITH bumped AS (UPDATE {client} SET {q('head')} = {q('head')} + %s"
            f" WHERE {q('id')} IN (@) RETURNING {q('id')}, {q('head')})"
            f" INSERT INTO {delivery} ({q('client_id')}, {q('seq')}, {q('message_id')})"
            f" SELECT bumped.{q('id')}, bumped.{q('head')} - %s + v.column1, v.column2"
            f" FROM bumped, (VALUES ~) AS v"
        )
    return statements


def _room_dict(room: Room) -> dict:
    return {"name": room.name, "members": sorted(m.get_username() for m in room.members.all())}


def _get_room(name: object) -> Room:
    room = Room.objects.filter(name=validation.room_name(name)).first()
    if room is None:
        raise NotFound(f"no room named {name!r}", code="unknown_room")
    return room


def create_room(user: AnyUser | None, name: object) -> dict:
    """
    Create a room with its creator as the first member; Conflict if the name is taken.
    """
    owner = require_user(user)
    clean = validation.room_name(name)
    limit = conf.get("MESSAGING_MAX_ROOMS_PER_USER")
    try:
        with transaction.atomic():
            if limit is not None:
                # Counted under the user lock: concurrent creates of one user cannot overshoot.
                lock_user(owner.pk)
                if Room.objects.filter(created_by_id=owner.pk).count() >= limit:
                    raise Conflict(
                        f"you have created {limit} rooms, the most one user may create",
                        code="too_many_rooms",
                    )
            room = Room.objects.create(name=clean, created_by_id=owner.pk)
            room.members.add(owner.pk)
    except IntegrityError:
        raise Conflict(f"a room named {clean!r} exists", code="room_exists") from None
    logger.info("room %s created by user %s", clean, owner.pk)
    return _room_dict(room)


def join_room(user: AnyUser | None, name: object) -> dict:
    """
    Join a room (rooms are open); joining twice is harmless.
    """
    owner = require_user(user)
    room = _get_room(name)
    room.members.add(owner.pk)
    return _room_dict(room)


def leave_room(user: AnyUser | None, name: object) -> dict:
    """
    Leave a room; the user's tabs get none of its later messages. Leaving twice is harmless.
    """
    owner = require_user(user)
    room = _get_room(name)
    room.members.remove(owner.pk)
    return _room_dict(room)


def list_rooms(user: AnyUser | None) -> list[dict]:
    """
    The rooms the user is a member of, by name.
    """
    owner = require_user(user)
    rooms = Room.objects.filter(members=owner.pk).order_by("name").prefetch_related("members")
    return [_room_dict(room) for room in rooms]


def room_history(
    user: AnyUser | None, name: object, before: int | None, limit: int
) -> list[tuple[int, str]]:
    """
    Up to `limit` messages of a room with id < `before` (all when None), newest last; members
    only.
    """
    owner = require_user(user)
    room = _get_room(name)
    if not room.members.filter(pk=owner.pk).exists():
        raise Forbidden("only members can read this room", code="not_a_member")
    qs = Message.objects.filter(room=room)
    if before is not None:
        qs = qs.filter(id__lt=before)
    rows = list(qs.order_by("-id").values_list("id", "wire")[:limit])
    rows.reverse()
    return rows


def notify_typing(user: AnyUser | None, name: object) -> None:
    """
    Tell the other members' sockets that `user` is typing in a room (ephemeral, never queued).
    """
    owner = require_user(user)
    room = _get_room(name)
    member_ids = set(room.members.values_list("id", flat=True))
    if owner.pk not in member_ids:
        raise Forbidden("only members can type in this room", code="not_a_member")
    event = {"type": "messaging.typing", "room": room.name, "user": owner.get_username()}
    group_send_now([(user_group(uid), event) for uid in member_ids if uid != owner.pk])
