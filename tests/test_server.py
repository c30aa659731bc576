"""A real daphne process: a person logs in, and the protocol works over real sockets."""

import json

import pytest
import websockets

from tests.servers import Deployment, Session


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    yield dep
    dep.close()


async def recv_json(ws, timeout: float = 5) -> dict:
    import asyncio

    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_login_register_send_receive_ack_over_a_real_server(deployment):
    """Through a real daphne: log in with the login form, register a tab, send to oneself over
    the WebSocket, get sent + delivery, ack, and find the queue empty over HTTP."""
    deployment.create_user("dora", "dora-pass-1")
    server = deployment.start()
    session = Session(server.base_url)
    session.login("dora", "dora-pass-1")
    status, page = session.request("GET", "/")
    assert status == 200 and "dora" in page
    status, created = session.request("POST", "/api/clients/")
    assert status == 201
    cid = created["client_id"]
    url = f"{server.ws_url}/ws/?client_id={cid}"
    async with websockets.connect(url, additional_headers=session.ws_headers()) as ws:
        assert await recv_json(ws) == {"type": "hello", "client_id": cid, "head": 0}
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "client_msg_id": "c1",
                    "to": {"user": "dora"},
                    "body": {"text": "héllo"},
                }
            )
        )
        frames = [await recv_json(ws), await recv_json(ws)]
        kinds = sorted(f["type"] for f in frames)
        assert kinds == ["delivery", "sent"]
        delivery = next(f for f in frames if f["type"] == "delivery")
        assert delivery["seq"] == 1 and delivery["message"]["body"] == {"text": "héllo"}
        await ws.send(json.dumps({"type": "ack", "seq": 1}))
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong", "head": 1}
    status, page = session.request("GET", f"/api/clients/{cid}/messages")
    assert status == 200 and page == {"deliveries": [], "head": 1}


async def test_refusals_arrive_as_close_codes_over_a_real_server(deployment):
    """daphne delivers the protocol's close codes (accept first, then close), not an HTTP 403."""
    deployment.create_user("eve", "eve-pass-1")
    server = deployment.start()
    anon = {"Origin": server.base_url}
    async with websockets.connect(
        f"{server.ws_url}/ws/?client_id=x", additional_headers=anon
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd.code == 4401
    session = Session(server.base_url)
    session.login("eve", "eve-pass-1")
    async with websockets.connect(
        f"{server.ws_url}/ws/?client_id=nope", additional_headers=session.ws_headers()
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd.code == 4400


def test_the_served_application_tunes_the_garbage_collector(settings):
    """Loading the ASGI application (as daphne does) freezes what start-up loaded and sets
    SERVER_GC_THRESHOLDS; "off" leaves Python's defaults."""
    import gc
    import os
    import subprocess
    import sys

    import chatproject.asgi  # noqa: F401 (loaded by the suite already)

    assert gc.get_threshold() == settings.SERVER_GC_THRESHOLDS == (10000, 50, 100)
    assert gc.get_freeze_count() > 0
    probe = "import gc, chatproject.asgi; print(gc.get_threshold(), gc.get_freeze_count() > 0)"
    env = {"SERVER_GC_THRESHOLDS": "off", "DJANGO_SETTINGS_MODULE": "chatproject.settings"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[-1] == "False" and out[0] == "(700,"
