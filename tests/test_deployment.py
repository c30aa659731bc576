"""The documented production shape (docs/deployment.md): nginx with deploy/nginx.conf, over TLS, in
front of daphne as deploy/tabrelay@.service runs it, with deploy/production.env. Hostile bodies are
refused by nginx before they are read, and nobody else waits for them.

nginx comes from Debian's package (scripts/deploy-deps, called by scripts/test). Without it these
tests skip with a reason, except in CI (CI=true), where they fail."""

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.servers import Deployment, Server, free_port
from tests.test_safe_defaults import PRODUCTION_ENV, ROOT, env_file

NGINX = os.environ.get("NGINX_PATH", "/usr/sbin/nginx")
NGINX_SITE = ROOT / "deploy" / "nginx.conf"
UNIT = ROOT / "deploy" / "tabrelay@.service"
PASSWORD = "dora-pass-1"
SERVER_TOKEN = "s" * 43
MiB = 1024 * 1024
# How long the hostile clients keep sending while others are timed.
LOAD_SECONDS = 3.0


def _require(binary: str, what: str) -> None:
    if shutil.which(binary) or os.access(binary, os.X_OK):
        return
    reason = f"{what} is not installed ({binary}; scripts/deploy-deps installs nginx)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx does not listen on {port}: {log.read_text()[-3000:]}")


def unit_daphne_args() -> tuple[str, ...]:
    """
    The daphne options of deploy/tabrelay@.service, less its address (the test picks a port).
    """
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart="))
    words = line.split()
    args = words[words.index("daphne") + 1 : -1]
    for flag in ("--bind", "--port"):
        i = args.index(flag)
        del args[i : i + 2]
    return tuple(args)


class Stack:
    """
    nginx (TLS on a loopback port) in front of one daphne process.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.https_port, self.http_port = free_port(), free_port()
        self.origin = f"https://127.0.0.1:{self.https_port}"
        documented = env_file(PRODUCTION_ENV)
        for own in ("DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"):
            documented.pop(own)  # the harness's throwaway ones
        static = workdir / "static"
        self.deployment = Deployment(
            workdir,
            **{
                **documented,
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
                "DJANGO_CSRF_TRUSTED_ORIGINS": self.origin,
                "DJANGO_STATIC_ROOT": str(static),
                "MESSAGING_SERVER_API_TOKEN": SERVER_TOKEN,
            },
        )
        self.nginx: subprocess.Popen | None = None
        try:
            self.deployment.manage("collectstatic", "--noinput", "-v", "0")
            self.deployment.create_user("dora", PASSWORD)
            self.server: Server = self.deployment.start(daphne_args=unit_daphne_args())
            self._start_nginx(static)
        except BaseException:
            self.close()
            raise
        self.tls = ssl.create_default_context(cafile=str(workdir / "cert.pem"))

    def _start_nginx(self, static: Path) -> None:
        w = self.workdir
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(w / "key.pem"), "-out", str(w / "cert.pem")],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        site = NGINX_SITE.read_text()
        for name, value in {
            "@SERVER_NAME@": "127.0.0.1",
            "@HTTPS_LISTEN@": f"127.0.0.1:{self.https_port}",
            "@HTTP_LISTEN@": f"127.0.0.1:{self.http_port}",
            "@CERT@": str(w / "cert.pem"),
            "@CERT_KEY@": str(w / "key.pem"),
            "@DAPHNE@": f"127.0.0.1:{self.server.port}",
            "@STATIC_ROOT@": str(static),
        }.items():
            site = site.replace(name, value)
        left = re.findall(r"@[A-Z_]+@", re.sub(r"#.*", "", site))
        assert not left, f"placeholders left in {NGINX_SITE.name}: {left}"
        temp = "\n".join(
            f"  {kind}_temp_path {w / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                            "uwsgi", "scgi")
        )  # fmt: skip
        mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() else ""
        # One process, as the user running the test (no worker switching to another user).
        (w / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {w / 'nginx.pid'};\n"
            f"error_log {w / 'nginx-error.log'} warn;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n  {mime}\n  access_log off;\n{temp}\n{site}\n}}\n"
        )
        log = w / "nginx.log"
        self.nginx = subprocess.Popen(
            [NGINX, "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "nginx-error.log")],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        _wait_port(self.https_port, self.nginx, w / "nginx-error.log")

    def close(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGTERM)
            try:
                self.nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait(timeout=10)
        self.deployment.close()


@pytest.fixture
def stack(tmp_path):
    _require(NGINX, "nginx")
    _require("openssl", "openssl")
    stack = Stack(tmp_path)
    yield stack
    stack.close()


class Browser:
    """
    Cookies, the CSRF token and the Origin of the site, over HTTPS through nginx.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cookies: dict[str, str] = {}
        self.set_cookie: dict[str, str] = {}

    def cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.stack.https_port, context=self.stack.tls, timeout=5
        )
        headers = {"Origin": self.stack.origin, "Referer": self.stack.origin + path}
        if self.cookies:
            headers["Cookie"] = self.cookie_header()
        if body or method != "GET":
            headers["Content-Type"] = content_type
            headers["X-CSRFToken"] = self.cookies.get("csrftoken", "")
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";")[0]
            self.set_cookie[name] = value
        return response.status, response, data

    def login(self) -> None:
        self.request("GET", "/accounts/login/")
        form = f"username=dora&password={PASSWORD}&csrfmiddlewaretoken={self.cookies['csrftoken']}"
        status, _, _ = self.request(
            "POST", "/accounts/login/", form.encode(), "application/x-www-form-urlencoded"
        )
        assert status == 302 and self.cookies.get("sessionid"), status

    def register(self) -> str:
        status, _, data = self.request("POST", "/api/clients/")
        assert status == 201, data
        return json.loads(data)["client_id"]

    def socket(self, client_id: str):
        return ws_connect(
            f"wss://127.0.0.1:{self.stack.https_port}/ws/?client_id={client_id}",
            ssl=self.stack.tls,
            additional_headers={"Cookie": self.cookie_header(), "Origin": self.stack.origin},
            open_timeout=5,
        )


def ping(ws) -> float:
    """
    Seconds from a ping frame to its pong.
    """
    start = time.monotonic()
    ws.send(json.dumps({"type": "ping"}))
    while json.loads(ws.recv(timeout=5))["type"] != "pong":
        pass
    return time.monotonic() - start


def test_the_documented_shape_serves_pages_api_sockets_and_static_files(stack):
    """Through nginx over TLS: redirect to HTTPS, static files from STATIC_ROOT, secure cookies
    and HSTS, the API, the close beacon, and a WebSocket with ping/pong."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=5)
    conn.request("GET", "/accounts/login/")
    assert conn.getresponse().status == 301
    conn.close()

    browser = Browser(stack)
    status, response, data = browser.request("GET", "/static/messaging/relay.js")
    assert status == 200 and response.headers["Server"].startswith("nginx")
    assert data == (ROOT / "messaging/static/messaging/relay.js").read_bytes()
    browser.login()
    assert "; Secure" in browser.set_cookie["sessionid"]
    assert "; Secure" in browser.set_cookie["csrftoken"]
    status, response, data = browser.request("GET", "/api/rooms/")
    assert status == 200 and json.loads(data) == {"rooms": []}
    assert "max-age=31536000" in response.headers["Strict-Transport-Security"]
    client_id = browser.register()
    with browser.socket(client_id) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        assert ping(ws) < 1
    boundary = uuid.uuid4().hex
    beacon = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n'
        f"{browser.cookies['csrftoken']}\r\n--{boundary}--\r\n"
    ).encode()
    form = f"multipart/form-data; boundary={boundary}"
    status, _, data = browser.request("POST", f"/api/clients/{client_id}/close", beacon, form)
    assert status == 204, data
    # /metrics: refused by nginx; served on daphne's loopback port over plain HTTP (exempt from
    # the HTTPS redirect) to the address deploy/production.env allows.
    status, _, _ = browser.request("GET", "/metrics")
    assert status == 404
    conn = http.client.HTTPConnection("127.0.0.1", stack.server.port, timeout=5)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and b"tabrelay_sends_total" in response.read()
    conn.close()

    # The server API: a bearer token and no session; through nginx to the app, which publishes.
    service = http.client.HTTPSConnection("127.0.0.1", stack.https_port, context=stack.tls)
    publish = json.dumps({"to": {"user": "dora"}, "body": "hi", "key": "k"})
    for authorization, expected in ((None, 401), ("Bearer wrong", 401), (SERVER_TOKEN, 201)):
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = (
                authorization if " " in authorization else f"Bearer {authorization}"
            )
        service.request("POST", "/api/server/publish", publish, headers)
        answer = service.getresponse()
        assert (answer.status, json.loads(answer.read()).get("duplicate")) == (
            expected,
            False if expected == 201 else None,
        )
    service.close()


# -- hostile bodies ------------------------------------------------------------------------------


def chunked(total: int, piece: bytes) -> Iterator[bytes]:
    """
    A chunked request body of `total` bytes made of `piece`.
    """
    sent = 0
    while sent < total:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
        sent += len(piece)
    yield b"0\r\n\r\n"


def plain(total: int, piece: bytes) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


def hostile(
    stack: Stack, head: str, body: Iterator[bytes], *, wait_first: bool = False
) -> tuple[int | None, int]:
    """
    Send request head `head`, then `body` as fast as the server takes it until it answers; the
    answer's status and the body bytes sent. With `wait_first`, send no body until the answer
    (or 2 s): the answer then cannot depend on the body.
    """
    sent = 0
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=5) as raw:
        with stack.tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
            if wait_first:
                select.select([sock], [], [], 2)
            for chunk in body:
                if sock.pending() or select.select([sock], [], [], 0)[0]:
                    break
                try:
                    sock.sendall(chunk)
                except OSError:
                    break
                sent += len(chunk)
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, sent


def heads(stack: Stack, session: str) -> dict[str, tuple[str, Iterator[bytes], int]]:
    """
    Hostile requests (head, body, the status expected), made afresh for each use.
    """
    host = f"Host: 127.0.0.1:{stack.https_port}\nOrigin: {stack.origin}"
    boundary = "b" * 20
    form = f"multipart/form-data; boundary={boundary}"
    # Many one-byte fields: what bare daphne's twisted.web parses slowest (4.6 s for 12 MiB).
    fields = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    parts = (fields.encode() * 2000)[: 64 * 1024]
    return {
        # The freeze of issue #12: a 12 MiB multipart POST, anonymous, to an API URL.
        "anonymous 12 MiB multipart": (
            f"POST /api/messages/ HTTP/1.1\n{host}\nContent-Type: {form}\n"
            f"Content-Length: {12 * MiB}\n",
            plain(12 * MiB, parts),
            413,
        ),
        # The same, chunked (no Content-Length to refuse on) and with a session.
        "logged-in 12 MiB chunked multipart": (
            f"POST /api/messages/ HTTP/1.1\n{host}\nCookie: {session}\nContent-Type: {form}\n"
            "Transfer-Encoding: chunked\n",
            chunked(12 * MiB, parts),
            415,
        ),
        "anonymous 128 MiB chunked": (
            f"POST /api/messages/ HTTP/1.1\n{host}\nContent-Type: application/json\n"
            "Transfer-Encoding: chunked\n",
            chunked(128 * MiB, b"[" * 64 * 1024),
            401,
        ),
        "anonymous 300 KiB": (
            f"POST /api/clients/ HTTP/1.1\n{host}\nContent-Type: application/json\n"
            f"Content-Length: {300 * 1024}\n",
            plain(300 * 1024, b" " * 1024),
            401,
        ),
        "logged-in 1 GiB declared": (
            f"POST /api/messages/ HTTP/1.1\n{host}\nCookie: {session}\n"
            f"Content-Type: application/json\nContent-Length: {1024 * MiB}\n",
            plain(1024 * MiB, b"[" * 64 * 1024),
            413,
        ),
        # A form to twisted.web's parser, though no "multipart" is spelled out (RFC 2047).
        "logged-in multipart in other words": (
            f"POST /api/messages/ HTTP/1.1\n{host}\nCookie: {session}\n"
            f"Content-Type: =?utf-8?q?multipart?=/form-data; boundary={boundary}\n"
            "Transfer-Encoding: chunked\n",
            chunked(12 * MiB, parts),
            415,
        ),
        # The server API: no session cookie, so no Authorization header is no credentials at all.
        "server API without a token": (
            f"POST /api/server/publish HTTP/1.1\n{host}\nContent-Type: application/json\n"
            f"Content-Length: {300 * 1024}\n",
            plain(300 * 1024, b" " * 1024),
            401,
        ),
        "server API multipart with a token": (
            f"POST /api/server/publish HTTP/1.1\n{host}\nAuthorization: Bearer x\n"
            f"Content-Type: {form}\nTransfer-Encoding: chunked\n",
            chunked(12 * MiB, parts),
            415,
        ),
        "anonymous 100 KiB login form": (
            f"POST /accounts/login/ HTTP/1.1\n{host}\n"
            f"Content-Type: application/x-www-form-urlencoded\nContent-Length: {100 * 1024}\n",
            plain(100 * 1024, b"a=&" * 1024),
            413,
        ),
        # The socket's URL takes a handshake (a GET) and nothing else: a form posted there
        # would reach twisted.web's parser with no allow-list in the way.
        "anonymous multipart to the socket URL": (
            f"POST /ws/ HTTP/1.1\n{host}\nContent-Type: {form}\n"
            f"Content-Length: {380 * 1024}\n",
            plain(380 * 1024, parts),
            413,  # its 1 KiB limit comes first; a smaller one gets 405
        ),
        "multipart to /api without its slash": (
            f"POST /api HTTP/1.1\n{host}\nCookie: {session}\nContent-Type: {form}\n"
            f"Content-Length: {60 * 1024}\n",
            plain(60 * 1024, parts),
            301,  # nginx sends /api to /api/ itself
        ),
        "multipart to the login form": (
            f"POST /accounts/login/ HTTP/1.1\n{host}\nContent-Type: {form}\n"
            "Transfer-Encoding: chunked\n",
            chunked(12 * MiB, parts),
            415,
        ),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_hostile_bodies_are_refused_unread_and_stall_nobody(stack):
    """Oversized, anonymous and form bodies get 413/401/415 before any of them is sent, and
    while clients keep sending them a logged-in GET and a socket's ping answer within 1 s,
    with daphne's and nginx's memory bounded."""
    browser = Browser(stack)
    browser.login()
    session = f"sessionid={browser.cookies['sessionid']}"

    # Each one is answered from its head alone: no body byte is sent before the answer.
    for name, (head, body, expected) in heads(stack, session).items():
        assert hostile(stack, head, body, wait_first=True) == (expected, 0), name

    client_id = browser.register()
    with browser.socket(client_id) as ws:
        json.loads(ws.recv(timeout=5))
        ping(ws)
        before = {"daphne": rss_kib(stack.server.proc.pid), "nginx": rss_kib(stack.nginx.pid)}
        stop = threading.Event()
        outcomes: list[tuple[str, int | None, int, int]] = []

        def keep_sending(names: list[str]) -> None:
            while not stop.is_set():
                for name in names:
                    head, body, expected = heads(stack, session)[name]
                    status, sent = hostile(stack, head, body)
                    outcomes.append((name, status, expected, sent))

        names = list(heads(stack, session))
        senders = [
            threading.Thread(target=keep_sending, args=(names[i::2],), daemon=True)
            for i in range(2)
        ]
        for sender in senders:
            sender.start()
        slowest = {"GET": 0.0, "ping": 0.0}
        pinged = 0.0
        try:
            deadline = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < deadline:
                start = time.monotonic()
                status, _, _ = browser.request("GET", "/api/rooms/")
                assert status == 200
                slowest["GET"] = max(slowest["GET"], time.monotonic() - start)
                # Pings are rate-limited per socket (a burst of 10, then 1/s): 2 a second.
                if time.monotonic() - pinged > 0.5:
                    pinged = time.monotonic()
                    slowest["ping"] = max(slowest["ping"], ping(ws))
                time.sleep(0.05)
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=30)
        after = {"daphne": rss_kib(stack.server.proc.pid), "nginx": rss_kib(stack.nginx.pid)}

    assert slowest["GET"] < 1 and slowest["ping"] < 1, slowest
    assert len(outcomes) >= len(names), outcomes
    assert all(status == expected for _, status, expected, _ in outcomes), outcomes
    sent = sum(s for *_, s in outcomes)
    for process in ("daphne", "nginx"):
        grown = after[process] - before[process]
        assert grown < 16 * 1024, f"{process} grew {grown} KiB while {sent >> 20} MiB were sent"


def test_nginx_body_limit_is_the_apps_own():
    """deploy/nginx.conf's server-wide client_max_body_size is the app's largest request."""
    from messaging import conf

    limits = re.findall(r"^    client_max_body_size (\d+)k;", NGINX_SITE.read_text(), re.M)
    assert limits == [str(conf.max_request_bytes() // 1024)]
    assert conf.max_request_bytes() % 1024 == 0
