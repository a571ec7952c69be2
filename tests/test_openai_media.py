"""media.fetch_image against a loopback HTTP server: allow-list, address vetting, redirects, limits."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from spyre_backend.openai_api.media import MediaError, MediaPolicy, address_kind, fetch_image, host_allowed


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
BIG = 4096  # bytes the "big" paths send; the tests set max_bytes below it


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hosts: list[str] = []  # Host headers seen, in order

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", length: bool = True, **headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self, pieces):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        Handler.hosts.append(self.headers["Host"])
        port = self.server.server_address[1]
        path = self.path
        try:
            if path == "/img.png":
                self._send(200, PNG, Content_Type="application/octet-stream")  # type is not trusted
            elif path == "/redirect":
                self._send(302, Location="/img.png")
            elif path == "/redirect-absolute":
                self._send(301, Location=f"http://127.0.0.1:{port}/img.png")
            elif path == "/cross-host":
                self._send(302, Location=f"http://localhost:{port}/img.png")
            elif path.startswith("/chain/"):
                n = int(path.rsplit("/", 1)[1])
                self._send(200, PNG) if n == 0 else self._send(307, Location=f"/chain/{n - 1}")
            elif path == "/chunked":
                self._chunked([PNG[i:i + 50] for i in range(0, len(PNG), 50)])
            elif path == "/big-chunked":
                self._chunked([b"x" * 512] * (BIG // 512))
            elif path == "/big-length":
                self._send(200, b"x" * BIG)
            elif path == "/big-eof":  # no length, no chunking: the body ends when the server closes
                self.close_connection = True
                self._send(200, b"x" * BIG, length=False)
            elif path == "/slow":  # a body that trickles in forever (well, for 5 s)
                self.close_connection = True
                self._send(200, length=False)
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self._send(404, b"not here")
        except OSError:  # the client hung up, as it should on refusals
            pass


@pytest.fixture(scope="module")
def base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOCAL = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True, timeout_s=5)


def fetch(url: str, policy: MediaPolicy = LOCAL, index: int = 0) -> bytes:
    return asyncio.run(fetch_image(url, policy, index))


def refused(url: str, policy: MediaPolicy = LOCAL, index: int = 0) -> str:
    with pytest.raises(MediaError) as info:
        fetch(url, policy, index)
    return str(info.value)


# --- pure functions --------------------------------------------------------------------------

def test_from_text():
    policy = MediaPolicy.from_text(" A.com, b.ORG.,,c.net d.io ", max_bytes=5)
    assert policy.allowed_domains == ("a.com", "b.org", "c.net", "d.io")
    assert policy.max_bytes == 5
    assert MediaPolicy.from_text("").allowed_domains == ()


def test_host_matching():
    domains = ("a.com", "127.0.0.1", "::1")
    assert host_allowed("a.com", domains)
    assert host_allowed("img.a.com", domains)
    assert host_allowed("deep.img.A.COM.", domains)
    assert not host_allowed("evila.com", domains)
    assert not host_allowed("a.com.evil.net", domains)
    assert not host_allowed("com", domains)
    assert host_allowed("127.0.0.1", domains)
    assert host_allowed("0:0:0::1", domains)  # the same IPv6 address, spelt differently
    assert not host_allowed("127.0.0.2", domains)
    assert not host_allowed("1.127.0.0.1", ("127.0.0.1",))  # a name is never a "subdomain" of an IP
    assert not host_allowed("10.0.0.1", ("0.0.1",))  # IP literals never match as "subdomains"
    assert not host_allowed("img.a.com", ("img.b.a.com",))
    assert not host_allowed("a.com", ())


def test_address_classification():
    for address, kind in [("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.1", "private"),
                          ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("127.0.0.1", "loopback"),
                          ("::1", "loopback"), ("fe80::1", "link-local"), ("::ffff:127.0.0.1", "loopback"),
                          ("::ffff:10.0.0.1", "private"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
                          ("224.0.0.1", "multicast"), ("fc00::1", "private"), ("240.0.0.1", "reserved"),
                          ("100.64.0.1", "non-global")]:
        assert address_kind(address) == kind, address
    for public in ("93.184.216.34", "8.8.8.8", "172.32.0.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert address_kind(public) is None, public


# --- refusals before any connection ----------------------------------------------------------

def test_no_domains_refuses_every_url():
    message = refused("https://example.com/cat.png", MediaPolicy(), index=2)
    assert message.startswith("image 2: image URLs are not fetched on this server")
    assert "--allowed-media-domains" in message


def test_domain_not_in_list():
    message = refused("https://evil.example.net/x.png", MediaPolicy(allowed_domains=("example.com",)), index=1)
    assert message.startswith("image 1: ") and "'evil.example.net'" in message and "example.com" in message


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1/"])
def test_non_http_scheme(url):
    assert "only http and https" in refused(url)


def test_credentials_and_control_characters():
    assert "credentials" in refused("http://user:pw@127.0.0.1/img.png")
    assert "control characters" in refused("http://127.0.0.1/img.png\r\nX-Evil: 1")


# --- fetching --------------------------------------------------------------------------------

def test_loopback_refused_unless_allowed(base):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",))
    message = refused(f"{base}/img.png", policy, index=3)
    assert message.startswith("image 3: ") and "loopback address 127.0.0.1" in message
    assert "--allow-private-media-addresses" in message
    assert fetch(f"{base}/img.png") == PNG


def test_fetch_returns_exact_bytes_and_host_header(base):
    Handler.hosts.clear()
    assert fetch(f"{base}/img.png") == PNG
    assert Handler.hosts == [base.removeprefix("http://")]


def test_chunked_body(base):
    assert fetch(f"{base}/chunked") == PNG


@pytest.mark.parametrize("path", ["/redirect", "/redirect-absolute"])
def test_same_host_redirect_followed(base, path):
    assert fetch(base + path) == PNG


def test_cross_host_redirect_refused(base):
    message = refused(f"{base}/cross-host", MediaPolicy(allowed_domains=("127.0.0.1", "localhost"),
                                                        allow_private_addresses=True))
    assert "same host" in message and "localhost" in message


def test_redirect_limit(base):
    assert fetch(f"{base}/chain/3") == PNG  # three redirects: the default limit
    assert "more than 3 redirects" in refused(f"{base}/chain/4")
    assert "more than 0 redirects" in refused(f"{base}/redirect", MediaPolicy(
        allowed_domains=("127.0.0.1",), allow_private_addresses=True, max_redirects=0))


def test_404_refused(base):
    message = refused(f"{base}/missing.png", index=1)
    assert message.startswith("image 1: ") and "404" in message


@pytest.mark.parametrize("path", ["/big-length", "/big-chunked", "/big-eof"])
def test_size_limit(base, path):
    small = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True, max_bytes=BIG - 1)
    message = refused(base + path, small)
    assert "limit of 4095 bytes" in message
    if path == "/big-length":
        assert "is 4096 bytes" in message  # refused from the declared length, before reading
    exact = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True, max_bytes=BIG)
    assert fetch(base + path, exact) == b"x" * BIG  # the limit itself is allowed


def test_timeout(base):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True, timeout_s=0.5)
    start = time.monotonic()
    message = refused(f"{base}/slow", policy)
    assert "timed out after 0.5 s" in message
    assert time.monotonic() - start < 2


def test_tls_failure_is_a_media_error(base):
    # the loopback server speaks plain HTTP: the TLS handshake fails, and says so as a MediaError
    message = refused(base.replace("http://", "https://") + "/img.png")
    assert "SSL" in message


# --- DNS: every address vetted, the connection goes to the vetted one ------------------------

def _fake_dns(monkeypatch, addresses):
    calls = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        calls.append(host)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port) if ":" not in a else (a, port, 0, 0)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_any_private_address_refuses(monkeypatch):
    _fake_dns(monkeypatch, ["93.184.216.34", "10.0.0.7"])
    message = refused("http://images.example.test/a.png", MediaPolicy(allowed_domains=("example.test",)))
    assert "'images.example.test'" in message and "private address 10.0.0.7" in message


def test_connects_to_resolved_address_with_original_host(monkeypatch, base):
    port = base.rsplit(":", 1)[1]
    calls = _fake_dns(monkeypatch, ["127.0.0.1"])
    Handler.hosts.clear()
    policy = MediaPolicy(allowed_domains=("example.test",), allow_private_addresses=True, timeout_s=5)
    assert fetch(f"http://Images.Example.test:{port}/redirect", policy) == PNG
    assert Handler.hosts == [f"images.example.test:{port}"] * 2
    assert calls == ["images.example.test"] * 2  # one lookup per hop, each hop vetted
