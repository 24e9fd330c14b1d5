"""`http(s)://` image URLs: off by default; when on (ALLOW_REMOTE_IMAGES=1), fetched without SSRF.

A caption request must not become a way to reach what only this server can reach (cloud metadata
at 169.254.169.254, localhost, the cluster network). So each hop resolves its host once, refuses
it unless every address is public, and connects to that checked address itself, sending the
original Host header and TLS SNI: a DNS answer that changes between check and connect (rebinding)
is never used. Redirects are followed only to the same host, re-checked. The body is streamed
under a byte cap and a wall-clock deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from service.errors import ImageError, shown

REMOTE_DISABLED = ("remote image URLs are disabled on this server (the operator can enable them with "
                   "ALLOW_REMOTE_IMAGES=1); send the image inline as a data:image/png;base64,... URL")
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# The IANA special-purpose address registries (IPv4: RFC 6890 and updates; IPv6 likewise), written down
# here so that what counts as public does not depend on the Python version: 3.11's `is_global` calls
# 192.0.0.192 (a cloud metadata address) and fec0::1 public. Every block listed is refused, including
# the few the registry marks globally reachable (anycast services an image host never is). Also refused:
# 168.63.129.16, a public address that every Azure VM reaches as its host's metadata and DHCP service.
_SPECIAL_V4 = tuple(ipaddress.ip_network(n) for n in (
    "168.63.129.16/32",
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_SPECIAL_V6 = tuple(ipaddress.ip_network(n) for n in (
    "2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20", "5f00::/16", "64:ff9b:1::/48", "100::/64"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class RemoteImagePolicy:
    enabled: bool = False
    timeout: float = 10.0  # seconds for the whole fetch, redirects included
    max_bytes: int = 8 * 1024 * 1024
    hosts: frozenset[str] = frozenset()  # empty: any public host; "*.example.com" allows subdomains

    @classmethod
    def from_settings(cls, enabled: bool, timeout: float, max_bytes: int, hosts: str) -> RemoteImagePolicy:
        return cls(enabled, timeout, max_bytes, frozenset(h.strip().lower() for h in hosts.split(",") if h.strip()))

    def host_allowed(self, host: str) -> bool:
        if not self.hosts:
            return True
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)


def is_public_address(addr: IPAddress) -> bool:
    """Only globally routable unicast; IPv4 embedded in IPv6 (mapped, 6to4, NAT64) is judged as IPv4."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (
            ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else None)
        if embedded is not None:
            return is_public_address(embedded)
        # Outside 2000::/3 nothing is public (ULA fc00::/7, site-local fec0::/10, link-local, multicast...).
        return addr in _GLOBAL_UNICAST_V6 and not any(addr in net for net in _SPECIAL_V6)
    return not any(addr in net for net in _SPECIAL_V4)


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ImageError(f"image host '{shown(host)}' could not be resolved") from None
    # scope ids ("fe80::1%eth0") are dropped: such addresses are link-local and refused anyway
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def fetch_image(url: str, policy: RemoteImagePolicy, *,
                _resolve: Callable[[str, int], list[IPAddress]] = resolve,
                _is_allowed_address: Callable[[IPAddress], bool] = is_public_address) -> bytes:
    """The image's bytes, or ImageError. The underscored arguments exist only so that tests can fetch
    from a 127.0.0.1 server; production callers never pass them."""
    deadline = time.monotonic() + policy.timeout
    first_host = None
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _check_url(url, policy)
        if first_host is not None and host != first_host:
            raise ImageError(f"image URL redirects to another host ('{shown(host)}'); only same-host redirects "
                             "are followed")
        first_host = first_host or host
        addresses = _resolve(host, port)
        if not addresses or not all(_is_allowed_address(a) for a in addresses):
            raise ImageError(f"image host '{shown(host)}' is not a public address (loopback, private, link-local "
                             "and other internal addresses are refused)")
        status, location, raw = _get(scheme, host, port, target, addresses[0], policy, deadline)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise ImageError(f"image URL answered HTTP {status} without a Location")
            next_url = urljoin(url, location)
            if scheme == "https" and next_url.startswith("http://"):
                raise ImageError("image URL redirects from https to http; refused")
            url = next_url
            continue
        if status != 200:
            raise ImageError(f"fetching the image URL failed: HTTP {status}")
        return raw
    raise ImageError(f"image URL redirects more than {MAX_REDIRECTS} times")


def _check_url(url: str, policy: RemoteImagePolicy) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ImageError("image URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme '{parts.scheme[:16]}' is not supported; use http or https")
    if parts.username is not None or parts.password is not None:
        raise ImageError("image URLs with credentials are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ImageError("image URL has no host")
    if not policy.host_allowed(host):
        raise ImageError(f"image host '{shown(host)}' is not in this server's allowlist (REMOTE_IMAGE_HOSTS)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, target


def _get(scheme: str, host: str, port: int, target: str, address: IPAddress, policy: RemoteImagePolicy,
         deadline: float) -> tuple[int, str | None, bytes]:
    """One GET to the pinned address; the Host header and TLS name stay the URL's host."""
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        host_header += f":{port}"
    common = dict(host=str(address), port=port, maxsize=1, retries=False)
    if scheme == "https":
        context = ssl.create_default_context(cafile=certifi.where())
        pool = urllib3.HTTPSConnectionPool(**common, ssl_context=context, server_hostname=host,
                                           assert_hostname=host)
    else:
        pool = urllib3.HTTPConnectionPool(**common)
    try:
        with pool:
            response = pool.urlopen("GET", target, redirect=False, preload_content=False, decode_content=False,
                                    assert_same_host=False, timeout=_remaining(deadline, policy),
                                    headers={"Host": host_header, "Accept": "image/png, image/jpeg",
                                             "Accept-Encoding": "identity", "User-Agent": "caption-service"})
            try:
                if response.status != 200:
                    return response.status, response.headers.get("Location"), b""
                return 200, None, _read_capped(response, policy, deadline)
            finally:
                response.release_conn()
    except ImageError:
        raise
    except (urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError):
        raise ImageError(f"fetching the image URL timed out after {policy.timeout:g} s "
                         "(REMOTE_IMAGE_TIMEOUT)") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ImageError(f"fetching the image URL failed ({type(exc).__name__})") from None


def _read_capped(response, policy: RemoteImagePolicy, deadline: float) -> bytes:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise ImageError("image URL answered with a compressed encoding; refused")  # no decompression bombs
    too_big = ImageError(f"image at the URL is larger than {policy.max_bytes} bytes (REMOTE_IMAGE_MAX_BYTES)")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise too_big
    body = bytearray()
    while True:
        _remaining(deadline, policy)  # a server trickling bytes still meets the one deadline
        chunk = response.read1(_CHUNK)  # what has arrived, so the deadline is checked often
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > policy.max_bytes:
            raise too_big


def _remaining(deadline: float, policy: RemoteImagePolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageError(f"fetching the image URL timed out after {policy.timeout:g} s (REMOTE_IMAGE_TIMEOUT)")
    return left
