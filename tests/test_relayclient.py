"""The asyncio client against a real daphne: exactly once, in order, through faults."""

import asyncio
import signal

import pytest

from relayclient import RelayClient, SendFailed
from tests.servers import Deployment, free_port

USERS = ("alice", "bob")


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path, MESSAGING_SEND_RATE="None", MESSAGING_USER_SEND_RATE="None")
    dep.populate({name: f"{name}-pass-1" for name in USERS}, {"hall": list(USERS)})
    yield dep
    dep.close()


def tab(server, user: str, **kwargs) -> tuple[RelayClient, list]:
    got: list = []
    client = RelayClient(
        server.base_url,
        user,
        f"{user}-pass-1",
        on_message=lambda seq, m: got.append((seq, m["body"])),
        **kwargs,
    )
    return client, got


async def until(predicate, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def bodies(got: list) -> list:
    assert [seq for seq, _ in got] == list(range(1, len(got) + 1)), "seq gap or repeat"
    return [body for _, body in got]


async def test_room_messages_reach_every_tab_once_in_order(deployment):
    """Three tabs (two of the sender) each process every room message once, in order."""
    server = deployment.start()
    tabs = [tab(server, u) for u in ("alice", "alice", "bob")]
    for client, _ in tabs:
        await client.start()
    sender = tabs[0][0]
    ids = [await sender.send({"room": "hall"}, i) for i in range(30)]
    for cmid in ids:
        assert (await sender.wait_sent(cmid))["duplicate"] is False
    for _, got in tabs:
        await until(lambda got=got: len(got) >= 30)
    await asyncio.sleep(0.3)
    for client, got in tabs:
        assert bodies(got) == list(range(30))
        await client.stop()


async def test_lost_delivery_frames_are_recovered_by_resync(deployment):
    """Delivery frames lost in transit are noticed by the seq jump and fetched over HTTP."""
    server = deployment.start()
    (alice, _), (bob, got) = tab(server, "alice"), tab(server, "bob")
    await alice.start()
    await bob.start()
    await until(lambda: bob.status == "online")
    bob.inject_drop(3)
    for i in range(10):
        await alice.wait_sent(await alice.send({"user": "bob"}, i))
    await until(lambda: len(got) >= 10)
    assert bodies(got) == list(range(10))
    assert bob.stats["resyncs"] >= 1
    await alice.stop()
    await bob.stop()


async def test_server_killed_and_restarted_mid_stream_loses_and_doubles_nothing(deployment):
    """SIGKILL of the only server while a tab sends: after the restart the outbox is retried,
    duplicates are discarded, and the receiver has every message exactly once, in order."""
    port = free_port()
    server = deployment.start(port)
    (alice, _), (bob, got) = tab(server, "alice"), tab(server, "bob")
    await alice.start()
    await bob.start()
    await until(lambda: alice.status == bob.status == "online")
    ids = []
    for i in range(40):
        ids.append(await alice.send({"user": "bob"}, i))
        if i == 15:
            server.kill()
            deployment.start(port)
        await asyncio.sleep(0.01)
    for cmid in ids:
        await alice.wait_sent(cmid, timeout=30)
    await until(lambda: len(got) >= 40, timeout=30)
    await asyncio.sleep(0.5)
    assert bodies(got) == list(range(40))
    assert alice.state["outbox"] == {}
    await alice.stop()
    await bob.stop()


async def test_without_a_socket_everything_goes_over_http(deployment):
    """A tab whose socket can never connect still sends and receives every message once."""
    server = deployment.start()
    (alice, _), (bob, got) = tab(server, "alice"), tab(server, "bob", http_fallback_after=0.5)
    bob.ws_url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    await alice.start()
    await bob.start()
    for i in range(5):
        await alice.wait_sent(await alice.send({"user": "bob"}, i))
    reply = await bob.send({"user": "alice"}, "over http")
    assert (await bob.wait_sent(reply, timeout=20))["duplicate"] is False
    await until(lambda: len(got) >= 6)
    assert bodies(got) == [0, 1, 2, 3, 4, "over http"]
    assert bob.stats["http_sends"] >= 1
    await alice.stop()
    await bob.stop()


async def test_a_refused_send_fails_its_waiter_and_leaves_the_outbox(deployment):
    """A send the server refuses for good (unknown user) fails with its code, not retried."""
    server = deployment.start()
    alice, _ = tab(server, "alice")
    await alice.start()
    cmid = await alice.send({"user": "nobody"}, 1)
    with pytest.raises(SendFailed) as failed:
        await alice.wait_sent(cmid)
    assert failed.value.code == "unknown_user"
    assert cmid not in alice.state["outbox"]
    await alice.stop()


async def test_sigterm_while_tabs_leave_stops_the_server_promptly(deployment):
    """SIGTERM just as tabs close: the sockets' detaches announce presence from database
    threads, and must not wait on the stopped event loop (they held the process for good, until
    the harness's SIGKILL 10 s later)."""
    server = deployment.start()
    tabs = [tab(server, u)[0] for u in ("alice", "alice", "bob")]
    for client in tabs:
        await client.start()
    await until(lambda: all(c.status == "online" for c in tabs))
    for client in tabs:
        await client.stop()
    began = asyncio.get_running_loop().time()
    server.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.proc.wait, 20)
    assert asyncio.get_running_loop().time() - began < 5
    assert code is not None


async def test_acks_wait_for_ack_delay_unless_ack_every_deliveries_are_unacked(deployment):
    """Acks are cumulative and batched: nothing before ack_delay for a few deliveries, one at
    once when ack_every are unacked (the server's queue for the tab empties)."""
    server = deployment.start()
    (alice, _), (bob, got) = tab(server, "alice"), tab(server, "bob", ack_delay=30, ack_every=5)
    await alice.start()
    await bob.start()
    await until(lambda: bob.status == "online")

    async def queued() -> int:
        status, page = await bob.http.request("GET", f"/api/clients/{bob.client_id}/messages")
        assert status == 200
        return len(page["deliveries"])

    for i in range(4):
        await alice.wait_sent(await alice.send({"user": "bob"}, i))
    await until(lambda: len(got) == 4)
    await asyncio.sleep(0.5)
    assert await queued() == 4  # below ack_every, and ack_delay is far off
    await alice.wait_sent(await alice.send({"user": "bob"}, 4))
    await until(lambda: len(got) == 5)
    deadline = asyncio.get_running_loop().time() + 5
    while await queued():
        assert asyncio.get_running_loop().time() < deadline, "the fifth delivery sent no ack"
        await asyncio.sleep(0.1)
    await alice.stop()
    await bob.stop()


async def test_an_ack_the_server_could_not_write_is_sent_again():
    """An `unavailable` (or `internal_error`) frame without a client_msg_id is about an ack
    (the server writes acks in batches, apart from the frames): the client acks again."""
    sent = []

    class Socket:
        async def send(self, text):
            sent.append(text)

    client = RelayClient("http://127.0.0.1:9", "u", "p", state={"last_seq": 7}, ack_delay=0.01)
    client.ws, client.status, client._acked = Socket(), "online", 7
    await client._on_frame({"type": "error", "code": "unavailable", "detail": "retry"})
    await until(lambda: sent, timeout=2)
    assert sent == ['{"type": "ack", "seq": 7}']
    assert client._acked == 7


async def test_a_client_evicted_for_a_newer_one_stops_instead_of_evicting_back(tmp_path):
    """Past CLIENTS_MAX_PER_USER the oldest live client is closed with 4429: it stops (status
    evicted) rather than register again and evict another, and start() brings it back."""
    dep = Deployment(tmp_path, CLIENTS_MAX_PER_USER="1")
    try:
        dep.populate({"alice": "alice-pass-1"}, {})
        server = dep.start()
        (old, _), (new, _) = tab(server, "alice"), tab(server, "alice")
        await old.start()
        await until(lambda: old.status == "online")
        await new.start()
        await until(lambda: old.status == "evicted")
        await until(lambda: new.status == "online")
        await asyncio.sleep(0.5)
        assert new.status == "online" and old.status == "evicted" and old.client_id is None
        await old.stop()
        await old.start()
        await until(lambda: old.status == "online" and new.status == "evicted")
        await old.stop()
        await new.stop()
    finally:
        dep.close()
