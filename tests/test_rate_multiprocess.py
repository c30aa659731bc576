"""
The send rate limits across two real daphne processes sharing PostgreSQL and Redis: a client
or a user that sends through both processes gets one allowance, not one per process.
"""

import os

import pytest

from tests.servers import Deployment, Session

pytestmark = pytest.mark.skipif(
    not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
    reason="needs PostgreSQL + Redis (DATABASE_URL, REDIS_URL): the second half of make test",
)


def test_client_and_user_send_limits_hold_across_two_processes(tmp_path):
    """With a burst of 2 per client and 3 per user and no refill to speak of, alice's sends
    alternating between two processes are refused (429 rate_limited) past those bounds."""
    dep = Deployment(
        tmp_path,
        MESSAGING_SEND_RATE="0.001",
        MESSAGING_SEND_BURST="2",
        MESSAGING_USER_SEND_RATE="0.001",
        MESSAGING_USER_SEND_BURST="3",
    )
    try:
        dep.populate({"alice": "alice-pass-1", "bob": "bob-pass-1"}, {})
        a, b = dep.start(), dep.start()
        on_a, on_b = Session(a.base_url), Session(b.base_url)
        on_a.login("alice", "alice-pass-1")
        on_b.login("alice", "alice-pass-1")
        c1 = on_a.request("POST", "/api/clients/")[1]["client_id"]
        c2 = on_b.request("POST", "/api/clients/")[1]["client_id"]

        def send(session: Session, client_id: str, cmid: str) -> tuple[int, str | None]:
            status, body = session.request(
                "POST",
                "/api/messages/",
                {"client_id": client_id, "client_msg_id": cmid, "to": {"user": "bob"}, "body": 1},
            )
            return status, (body or {}).get("error", {}).get("code")

        assert send(on_a, c1, "1") == (201, None)
        assert send(on_b, c1, "2") == (201, None)
        assert send(on_a, c1, "3") == (429, "rate_limited")  # c1's bucket, spent on A and B
        assert send(on_b, c2, "4") == (201, None)
        assert send(on_a, c2, "5") == (429, "rate_limited")  # alice's bucket: 3 sends
        assert send(on_b, c1, "2") == (200, None)  # a retry of a stored send is answered
    finally:
        dep.close()
