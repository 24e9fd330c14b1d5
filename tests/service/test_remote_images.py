"""Remote image URLs: refused unless enabled, and then fetched without SSRF.

All traffic goes to a 127.0.0.1 http.server thread. Production code refuses loopback, so the
positive fetches pass the test-only `_resolve` / `_is_allowed_address` arguments; the refusal
tests use the real defaults and never open a connection (the server counts its requests).
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.errors import ImageError
from service import images
from service.images import image_from_url
from service import remote_images
from service.remote_images import RemoteImagePolicy, fetch_image, is_public_address
from tests.helpers import png_bytes

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PNG = png_bytes(40, 30, (10, 200, 30))
ENABLED = RemoteImagePolicy(enabled=True, timeout=2.0, max_bytes=100_000)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[tuple[str, str]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.hits.append((self.path, self.headers.get("Host", "")))
        port = self.server.server_address[1]
        routes = {
            "/cat.png": lambda: self._send(200, PNG),
            "/redirect-same": lambda: self._send(302, b"", {"Location": "/cat.png"}),
            "/redirect-other": lambda: self._send(302, b"", {"Location": f"http://other.test:{port}/cat.png"}),
            "/redirect-loop": lambda: self._send(302, b"", {"Location": "/redirect-loop"}),
            "/missing": lambda: self._send(404, b"no"),
            "/big-declared": lambda: self._send(200, b"\0" * 200_000),
            "/big-undeclared": self._stream_without_length,
            "/slow": lambda: (time.sleep(3), self._send(200, PNG)),
            "/trickle": self._trickle,
            "/gzip": lambda: self._send(200, b"\x1f\x8b", {"Content-Encoding": "gzip"}),
        }
        routes.get(self.path, lambda: self._send(404, b""))()

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _stream_without_length(self):
        self.send_response(200)
        self.send_header("Connection", "close")  # body ends when the connection does
        self.end_headers()
        try:
            for _ in range(50):
                self.wfile.write(b"\0" * 10_000)
        except OSError:
            pass
        self.close_connection = True

    def _trickle(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the fetcher hanging up mid-body (size cap, timeout) is expected here


@pytest.fixture()
def server():
    _Handler.hits = []
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _loopback_fetch(url: str, policy: RemoteImagePolicy = ENABLED, resolved: list | None = None) -> bytes:
    """Test seam: *.test names resolve to 127.0.0.1, and 127.0.0.1 alone is allowed."""
    def resolve(host, port):
        if resolved is not None:
            resolved.append(host)
        assert host.endswith(".test"), host  # nothing in these tests may leave loopback
        return [LOOPBACK]

    return fetch_image(url, policy, _resolve=resolve, _is_allowed_address=lambda a: a == LOOPBACK)


# Off by default --------------------------------------------------------------------------------------
def test_refused_by_default_with_a_message_saying_how_to_enable(server):
    with pytest.raises(ImageError, match=r"ALLOW_REMOTE_IMAGES=1"):
        image_from_url(f"http://127.0.0.1:{server}/cat.png", 10**8, RemoteImagePolicy())
    with pytest.raises(ImageError, match=r"ALLOW_REMOTE_IMAGES=1"):
        image_from_url("https://example.com/cat.png", 10**8, RemoteImagePolicy())
    assert _Handler.hits == []


def test_data_urls_still_decode():
    from tests.helpers import data_url
    assert image_from_url(data_url(PNG), 10**8, RemoteImagePolicy()).size == (40, 30)


# Fetching (through the loopback seam) ----------------------------------------------------------------
def test_fetches_from_the_pinned_address_with_the_original_host_header(server):
    resolved = []
    assert _loopback_fetch(f"http://images.test:{server}/cat.png", resolved=resolved) == PNG
    assert resolved == ["images.test"]  # resolved once, then connected to that address
    assert _Handler.hits == [("/cat.png", f"images.test:{server}")]


def test_image_from_url_decodes_a_fetched_image(server, monkeypatch):
    monkeypatch.setattr(images, "fetch_image", functools.partial(_loopback_fetch))
    image = image_from_url(f"http://images.test:{server}/cat.png", 10**8, ENABLED)
    assert image.size == (40, 30) and image.mode == "RGB"


def test_same_host_redirect_is_followed_and_revalidated(server):
    resolved = []
    assert _loopback_fetch(f"http://images.test:{server}/redirect-same", resolved=resolved) == PNG
    assert resolved == ["images.test", "images.test"]


def test_cross_host_redirect_is_refused(server):
    with pytest.raises(ImageError, match="another host"):
        _loopback_fetch(f"http://images.test:{server}/redirect-other")
    assert [path for path, _ in _Handler.hits] == ["/redirect-other"]  # other.test never contacted


def test_redirect_loop_is_bounded(server):
    with pytest.raises(ImageError, match="redirects more than 3 times"):
        _loopback_fetch(f"http://images.test:{server}/redirect-loop")
    assert len(_Handler.hits) == 4


def test_http_error_status(server):
    with pytest.raises(ImageError, match="HTTP 404"):
        _loopback_fetch(f"http://images.test:{server}/missing")


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_size_cap(server, path):
    with pytest.raises(ImageError, match=r"larger than 100000 bytes \(REMOTE_IMAGE_MAX_BYTES\)"):
        _loopback_fetch(f"http://images.test:{server}{path}")


def test_compressed_answer_is_refused(server):
    with pytest.raises(ImageError, match="compressed"):
        _loopback_fetch(f"http://images.test:{server}/gzip")


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_timeout_bounds_the_whole_fetch(server, path):
    policy = RemoteImagePolicy(enabled=True, timeout=0.5, max_bytes=100_000)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"timed out after 0.5 s \(REMOTE_IMAGE_TIMEOUT\)"):
        _loopback_fetch(f"http://images.test:{server}{path}", policy)
    assert time.monotonic() - start < 1.5


def test_https_goes_through_tls_to_the_pinned_address(server):
    # The loopback server speaks plain HTTP: the TLS handshake itself must fail, cleanly.
    with pytest.raises(ImageError, match=r"failed \((SSLError|ProtocolError|MaxRetryError)"):
        _loopback_fetch(f"https://images.test:{server}/cat.png")


# Never internal addresses (real defaults: no seam) ---------------------------------------------------
@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "localhost", "2130706433", "0.0.0.0", "10.0.0.1", "172.16.5.4", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "224.0.0.1", "240.0.0.1", "[::1]", "[::]", "[fe80::1]", "[fd00:ec2::254]",
    "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:10.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
])
def test_internal_addresses_are_refused(server, host):
    with pytest.raises(ImageError, match="not a public address"):
        fetch_image(f"http://{host}:{server}/cat.png", ENABLED)
    assert _Handler.hits == []


def test_every_resolved_address_must_be_public():
    mixed = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]
    with pytest.raises(ImageError, match="not a public address"):
        fetch_image("http://rebind.test/cat.png", ENABLED, _resolve=lambda h, p: mixed)


def test_metadata_name_resolving_to_link_local_is_refused():
    metadata = [ipaddress.ip_address("169.254.169.254")]
    with pytest.raises(ImageError, match="not a public address"):
        fetch_image("http://metadata.google.internal/computeMetadata/v1/", ENABLED, _resolve=lambda h, p: metadata)


def test_public_addresses_are_allowed_by_the_production_check():
    for text in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                 "64:ff9b::808:808", "2a00:1450:4001:81c::200e"]:
        assert is_public_address(ipaddress.ip_address(text)), text


@pytest.mark.parametrize("text", [
    # IANA special-purpose blocks, whatever this Python's `ipaddress` thinks of them.
    "192.0.0.192", "192.0.0.8", "192.0.0.9", "192.0.0.170", "::ffff:192.0.0.192", "fec0::1", "fec0::ffff",
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "127.0.0.1", "169.254.169.254", "172.31.0.1", "192.0.2.1",
    "192.88.99.1", "192.168.1.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1", "240.0.0.1",
    "255.255.255.255", "::", "::1", "::127.0.0.1", "fc00::1", "fd12::1", "fe80::1", "ff02::1", "100::1",
    "2001::1", "2001:db8::1", "2002:c000:0201::1", "3fff::1", "5f00::1", "64:ff9b:1::1", "64:ff9b::a00:1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "168.63.129.16", "::ffff:168.63.129.16",
])
def test_special_purpose_addresses_are_not_public(text):
    assert not is_public_address(ipaddress.ip_address(text)), text


@pytest.mark.parametrize("url, match", [
    ("ftp://example.com/a.png", "not supported"),
    ("http://user:pw@example.com/a.png", "credentials"),
    ("http:///a.png", "no host"),
    ("http://example.com:99999/a.png", "malformed"),
])
def test_malformed_urls(url, match):
    with pytest.raises(ImageError, match=match):
        fetch_image(url, ENABLED, _resolve=lambda h, p: pytest.fail("must not resolve"))


# Host allowlist (REMOTE_IMAGE_HOSTS) ---------------------------------------------------------------
def test_allowlist_is_enforced_before_resolving(server):
    policy = RemoteImagePolicy.from_settings(True, 2.0, 100_000, " images.test , *.cdn.test ")
    assert policy.hosts == {"images.test", "*.cdn.test"}
    assert _loopback_fetch(f"http://images.test:{server}/cat.png", policy) == PNG
    assert _loopback_fetch(f"http://eu.cdn.test:{server}/cat.png", policy) == PNG
    for host in ["evil.test", "cdn.test.evil.test", "badcdn.test", "images.test.evil.test"]:
        with pytest.raises(ImageError, match="REMOTE_IMAGE_HOSTS"):
            fetch_image(f"http://{host}:{server}/cat.png", policy, _resolve=lambda h, p: pytest.fail("resolved"))
    assert len(_Handler.hits) == 2


def test_empty_allowlist_allows_any_public_host():
    assert RemoteImagePolicy.from_settings(True, 1.0, 1, "").host_allowed("anything.example")
