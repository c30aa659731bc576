"""
The record of a chaos run and the checks on it: what was sent, what the server confirmed, what
every client processed, and what the database holds afterwards.

Every send carries a unique token in its body, so a message can be followed from the send call
through the server's `sent` answer to each client's processing and to its stored row.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

EXAMPLES = 5


@dataclass
class SendRecord:
    """
    One send: who sent it, to what, and what the server answered.
    """

    token: str
    user: str
    client_id: str
    to: dict
    ids: set[int] = field(default_factory=set)
    answers: int = 0
    duplicates: int = 0


@dataclass
class History:
    """
    Everything observed during a run (filled in by the run, checked by `check`).
    """

    members: dict[str, set[str]]  # room -> usernames
    sends: dict[str, SendRecord] = field(default_factory=dict)  # token -> record
    # client id -> its user, and the (seq, message) pairs that client processed, in order
    client_user: dict[str, str] = field(default_factory=dict)
    processed: dict[str, list[tuple[int, dict]]] = field(default_factory=lambda: defaultdict(list))
    identities_lost: list[str] = field(default_factory=list)

    def sending(self, token: str, user: str, client_id: str, to: dict) -> None:
        """
        A send is about to be made.
        """
        self.sends[token] = SendRecord(token, user, client_id, to)

    def answered(self, token: str, result: dict) -> None:
        """
        The server confirmed a send: {"id", "duplicate"}.
        """
        record = self.sends[token]
        record.ids.add(result["id"])
        record.answers += 1
        record.duplicates += bool(result["duplicate"])

    def on_message(self, client_id: str, seq: int, message: dict) -> None:
        """
        A client processed a delivery.
        """
        self.processed[client_id].append((seq, message))

    def targets(self, record: SendRecord) -> set[str]:
        """
        The users whose every client must receive this message (the sender's included).
        """
        if "room" in record.to:
            return set(self.members[record.to["room"]])
        return {record.user, record.to["user"]}

    def check(self, stored: list[dict] | None = None, queues: dict | None = None) -> dict:
        """
        Every violation found, by kind, each a list of examples. `stored` is the message table
        ({"id", "token"}) and `queues` the leftover queue entries, read after the run.
        """
        found: dict[str, list[Any]] = defaultdict(list)
        confirmed = {t: r for t, r in self.sends.items() if r.ids}
        for token, record in self.sends.items():
            if not record.ids:
                found["unconfirmed"].append(f"send {token} never answered `sent`")
            if len(record.ids) > 1:
                found["stored_twice"].append(f"send {token} answered with ids {sorted(record.ids)}")

        for client_id, items in self.processed.items():
            user = self.client_user.get(client_id, "?")
            seqs = [seq for seq, _ in items]
            if seqs != list(range(1, len(seqs) + 1)):
                bad = next((i for i, seq in enumerate(seqs) if seq != i + 1), len(seqs))
                found["gap_or_repeat"].append(
                    f"client {client_id[:8]} ({user}) seqs {seqs[max(0, bad - 2) : bad + 3]}"
                    f" at position {bad + 1}"
                )
            seen: dict[str, int] = {}
            room_ids: dict[str, list[int]] = defaultdict(list)
            for seq, message in items:
                token = _token(message)
                if token in seen:
                    found["duplicate_delivery"].append(
                        f"client {client_id[:8]} ({user}) processed {token} at seq {seen[token]}"
                        f" and again at seq {seq}"
                    )
                seen[token] = seq
                sent = self.sends.get(token)
                if sent is None:
                    found["unknown_message"].append(f"client {client_id[:8]} got {message!r:.200}")
                    continue
                if (
                    user not in self.targets(sent)
                    or message["to"] != sent.to
                    or message["from"]["user"] != sent.user
                ):
                    found["misdelivered"].append(
                        f"client {client_id[:8]} ({user}) got {token} from {sent.user}"
                        f" to {sent.to}"
                    )
                if "room" in message["to"]:
                    room_ids[message["to"]["room"]].append(message["id"])
            for room, ids in room_ids.items():
                if ids != sorted(ids):
                    first = next(i for i in range(1, len(ids)) if ids[i] < ids[i - 1])
                    found["out_of_order"].append(
                        f"client {client_id[:8]} saw room {room} ids {ids[first - 1 : first + 1]}"
                    )
            missing = [
                token
                for token, record in confirmed.items()
                if user in self.targets(record) and token not in seen
            ]
            for token in missing:
                found["lost"].append(f"client {client_id[:8]} ({user}) never got {token}")

        for client_id in self.identities_lost:
            found["identity_lost"].append(f"client {client_id[:8]} was replaced by a new client")

        if stored is not None:
            by_token: dict[str, list[int]] = defaultdict(list)
            for row in stored:
                by_token[row["token"]].append(row["id"])
            for token, ids in by_token.items():
                if len(ids) > 1:
                    found["stored_twice"].append(f"{token} is stored as messages {sorted(ids)}")
            for token in confirmed:
                if token not in by_token:
                    found["lost"].append(f"{token} was confirmed but is not stored")
        if queues is not None:
            for client_id, info in queues.items():
                if info["acked_entries"]:
                    found["acked_entry_left"].append(
                        f"client {client_id[:8]} still holds {info['acked_entries']} entries"
                        f" at or below its acked seq {info['acked_seq']}"
                    )
                if info["entries"]:
                    found["queue_not_drained"].append(
                        f"client {client_id[:8]} holds {info['entries']} entries after its"
                        " final ack"
                    )
        return dict(found)


def _token(message: dict) -> str:
    body = message.get("body")
    return body.get("token", "?") if isinstance(body, dict) else "?"


def summary_lines(violations: dict[str, list]) -> list[str]:
    """
    Human-readable lines: one per kind with its count, then a few examples.
    """
    lines = []
    for kind, examples in sorted(violations.items()):
        lines.append(f"  {kind}: {len(examples)}")
        lines.extend(f"    e.g. {example}" for example in examples[:EXAMPLES])
    return lines
