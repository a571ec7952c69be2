"""Fetches http(s) image URLs for the OpenAI front, only as the operator's ``MediaPolicy`` allows.

A server that fetches URLs for clients can be steered at its own network (SSRF), so: hosts must be
on an allow-list, every resolved address is vetted, and the connection goes to the vetted address
itself (a second DNS lookup could answer differently: DNS rebinding). A minimal HTTP/1.1 client on
``asyncio`` streams keeps all of this in one place, with one deadline over the whole fetch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from spyre_backend.config import InputLimits

REDIRECTS = (301, 302, 303, 307, 308)
MAX_HEADERS = 100


class MediaError(ValueError):
    """A client error about an image URL; the message says exactly what was refused and why (shown to the client as a 400)."""


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()  # empty: every http(s) URL is refused
    allow_private_addresses: bool = False  # private, loopback, link-local, reserved, multicast, unspecified IPs
    max_bytes: int = InputLimits.max_image_bytes  # body size limit: what preprocess takes
    timeout_s: float = 10.0  # total time for one fetch (connect + all reads)
    max_redirects: int = 3

    @classmethod
    def from_text(cls, domains: str, **kw) -> "MediaPolicy":
        """``"a.com, B.org"`` -> ``("a.com", "b.org")``; commas and/or spaces separate."""
        names = (_norm(d) for d in re.split(r"[,\s]+", domains or ""))
        return cls(allowed_domains=tuple(d for d in names if d), **kw)


def _norm(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """``host`` equals an allowed domain or is a subdomain of one; IP literals only match exactly."""
    host, domains = _norm(host), [_norm(d) for d in domains if _norm(d)]
    if (ip := _ip(host)) is not None:
        return any(_ip(d) == ip for d in domains)  # "0:0::1" is "::1"; "1.2.3.4" is no "subdomain"
    return any(host == d or host.endswith("." + d) for d in domains if _ip(d) is None)


def address_kind(address: str) -> str | None:
    """Why ``address`` is not a public one ("loopback", "private", ...), or None when it is public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 reaches 127.0.0.1
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, "is_" + kind):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"  # e.g. 100.64.0.0/10 (carrier-grade NAT)


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, ASCII host, port, request target) of an http(s) URL without credentials."""
    if any(c < " " or c == "\x7f" for c in url):  # CR/LF would let a client inject header lines
        raise MediaError("the URL contains control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise MediaError(f"invalid URL {url[:100]!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"only http and https URLs are fetched, got scheme {scheme!r}")
    if "@" in parts.netloc:
        raise MediaError("URLs with credentials (user:password@) are not fetched")
    if not host:
        raise MediaError(f"the URL {url[:100]!r} has no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = re.sub(r"[^\x21-\x7e]", lambda m: quote(m[0]), target)  # spaces, non-ASCII: percent-encoded
    return scheme, _norm(host), port or (443 if scheme == "https" else 80), target


async def _connect(scheme: str, host: str, port: int, policy: MediaPolicy):
    loop = asyncio.get_running_loop()
    try:  # loop.getaddrinfo runs in the default executor: the event loop never blocks on DNS
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaError(f"could not resolve host {host!r}: {exc.strerror}") from None
    if not policy.allow_private_addresses:
        for *_, sockaddr in infos:  # any bad address refuses: the host is not trusted
            if kind := address_kind(sockaddr[0]):
                raise MediaError(f"host {host!r} resolves to {kind} address {sockaddr[0]}; only public "
                                 "addresses are fetched (the operator can allow private ones with "
                                 "--allow-private-media-addresses)")
    error: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:  # connect to a vetted address, never re-resolve
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except BaseException as exc:  # cancelled (the deadline) or refused: the socket goes either way
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
            continue
        tls = ssl.create_default_context() if scheme == "https" else None
        return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=host if tls else None)
    raise MediaError(f"could not connect to {host!r} port {port}: {error}")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    too_big = MediaError(f"the image is larger than the server's limit of {limit} bytes")
    body = bytearray()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readline()).split(b";")[0].strip(), 16):  # "" -> ValueError
            if size < 0:
                raise MediaError("malformed chunked encoding")
            if len(body) + size > limit:
                raise too_big
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk; trailers are never read
        return bytes(body)
    if (length := headers.get("content-length")) is not None:
        if not length.strip().isdigit():
            raise MediaError(f"invalid Content-Length {length[:40]!r}")
        if int(length) > limit:  # refused before reading a byte of it
            raise MediaError(f"the image is {int(length)} bytes, over the server's limit of {limit} bytes")
        return await reader.readexactly(int(length))
    while chunk := await reader.read(65536):  # no length: the body ends when the server closes
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _get(scheme: str, host: str, port: int, target: str, policy: MediaPolicy):
    """One request: (status, headers, body); redirects come back with an empty body."""
    reader, writer = await _connect(scheme, host, port, policy)
    try:
        default_port = 443 if scheme == "https" else 80
        authority = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n"
                     "Accept-Encoding: identity\r\nUser-Agent: spyre-backend\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        if not (match := re.match(rb"HTTP/1\.[01] (\d{3})", await reader.readline())):
            raise MediaError(f"host {host!r} did not answer with HTTP/1.x")
        status, headers = int(match[1]), {}
        while line := (await reader.readline()).decode("latin-1").strip():  # ends at the blank line (or EOF)
            if len(headers) == MAX_HEADERS:  # a server must not be able to grow this without bound
                raise MediaError(f"host {host!r} sent more than {MAX_HEADERS} headers")
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status in REDIRECTS or not 200 <= status < 300:
            return status, headers, b""
        return status, headers, await _read_body(reader, headers, policy.max_bytes)
    finally:
        writer.close()  # not awaited: a TLS shutdown must not outlive the deadline


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    scheme, host, port, target = _split(url)
    if not policy.allowed_domains:
        raise MediaError("image URLs are not fetched on this server; send the image as a data: URI "
                         "(the operator can allow domains with --allowed-media-domains)")
    if not host_allowed(host, policy.allowed_domains):
        raise MediaError(f"host {host!r} is not in the allowed media domains ({', '.join(policy.allowed_domains)})")
    for _ in range(policy.max_redirects + 1):
        status, headers, body = await _get(scheme, host, port, target, policy)  # vets addresses each hop
        if status not in REDIRECTS:
            if not 200 <= status < 300:
                raise MediaError(f"fetching {url[:200]!r} failed with HTTP status {status}")
            return body
        if "location" not in headers:
            raise MediaError(f"HTTP {status} redirect without a Location header")
        url = urljoin(url, headers["location"])
        new_scheme, new_host, port, target = _split(url)
        # same host only (the allow-list was checked for it); https never drops back to plain http
        if new_host != host or (scheme, new_scheme) == ("https", "http"):
            raise MediaError(f"redirect from {scheme}://{host} to {url[:200]!r} refused: redirects are only "
                             "followed to the same host (http may become https)")
        scheme = new_scheme
    raise MediaError(f"more than {policy.max_redirects} redirects")


async def fetch_image(url: str, policy: MediaPolicy, index: int = 0) -> bytes:
    """The body of ``url`` (the image decoder checks the bytes, Content-Type is not trusted)."""
    try:
        return await asyncio.wait_for(_fetch(url, policy), policy.timeout_s)
    except MediaError as exc:
        raise MediaError(f"image {index}: {exc}") from None
    except TimeoutError:  # before OSError: TimeoutError is one
        raise MediaError(f"image {index}: fetching the URL timed out after {policy.timeout_s:g} s") from None
    except asyncio.IncompleteReadError:
        raise MediaError(f"image {index}: the connection closed before the whole body was received") from None
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:  # ssl.SSLError is an OSError
        raise MediaError(f"image {index}: fetching the URL failed: {type(exc).__name__}: {exc}") from None
