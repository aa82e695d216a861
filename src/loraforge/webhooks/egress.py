"""Where webhooks may go: public internet addresses only, checked after DNS and pinned.

A webhook URL is chosen by a tenant and fetched by our servers, so without a check it reaches
whatever those servers can: the cloud metadata service (``169.254.169.254``,
``metadata.google.internal``), PostgreSQL on ``localhost:5432``, other hosts of the private
network. Every spelling of those (``http://0/``, ``2130706433``, ``0x7f.1``, ``[::1]``,
``[::ffff:127.0.0.1]``) ends as an address after DNS resolution, so that is where the check
happens: every address a host resolves to must be a public one (:func:`blocked_reason`: not
loopback, private, link-local, CGNAT, unspecified, multicast, reserved, documentation, or an
IPv6 form that embeds such an IPv4 address). The connection then goes to the address that was
checked (:class:`Destination`: the URL's host is swapped for it, with ``Host`` and TLS SNI kept),
so a DNS answer that changes between check and connect (DNS rebinding) changes nothing.

The operator can allow internal receivers (``LORAFORGE_WEBHOOK_ALLOWED_HOSTS``: host names, IPs
or CIDRs); tests allow ``127.0.0.1``.

Written here rather than taken from a library: ``advocate`` wraps ``requests`` (we use httpx)
and had its last release in 2020; ``httpx-secure`` and ``safehttpx`` are async-only (the worker
delivers synchronously); ``drawbridge`` (httpx, both modes) is a 0.1 alpha. Each check is a few
lines of ``ipaddress`` and ``socket.getaddrinfo``; the rest is choosing what to say to whom.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names of metadata services that may resolve on some clouds (refused before any DNS lookup).
METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_BENCHMARK = ipaddress.IPv4Network("198.18.0.0/15")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Public addresses that are metadata endpoints all the same (Azure's wireserver).
_METADATA_IPS = frozenset({ipaddress.IPv4Address("168.63.129.16")})
# Resolving is bounded: a tenant's slow DNS server must not hold anything for long.
RESOLVE_TIMEOUT_SECONDS = 3.0
_RESOLVERS = 8


class DestinationRefused(Exception):
    """The URL may not be fetched; ``reason`` is for logs and the operator, not the tenant."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unresolvable(DestinationRefused):
    """The host did not resolve (or not in time)."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address (None: it is).

    IPv6 addresses that carry an IPv4 address (mapped, 6to4, Teredo, NAT64, IPv4-compatible) are
    judged by that IPv4 address too.
    """
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        candidates.append(inner)
    for addr in candidates:
        checks = (
            (addr.is_loopback, "loopback"),
            (addr.is_unspecified, "unspecified"),
            (addr.is_link_local, "link-local"),
            (addr.is_multicast, "multicast"),
            (addr.is_reserved, "reserved"),
            (isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT, "shared address space (CGNAT)"),
            (isinstance(addr, ipaddress.IPv4Address) and addr in _BENCHMARK, "benchmarking"),
            (addr in _METADATA_IPS, "cloud metadata"),
            (addr.is_private, "private"),
            (not addr.is_global, "not globally routable"),
        )
        for hit, why in checks:
            if hit:
                return f"{addr} is {why}"
    return None


def _host_key(host: str) -> str:
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class EgressPolicy:
    """Which destinations webhooks may reach: public addresses, plus what the operator allows.

    Args:
        allowed_names: host names allowed whatever they resolve to (lowercase, no trailing dot).
        allowed_networks: addresses and CIDRs allowed although not public.
    """

    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> EgressPolicy:
        """The policy of ``LORAFORGE_WEBHOOK_ALLOWED_HOSTS`` entries (names, IPs, CIDRs).

        Raises:
            ValueError: an entry is empty.
        """
        names: set[str] = set()
        networks: list[Network] = []
        for entry in entries:
            text = entry.strip().strip("[]")
            if not text:
                raise ValueError("an allowed webhook host is empty")
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                names.add(_host_key(text))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return _host_key(host) in self.allowed_names

    def refusal(self, host: str, ip: IPAddress) -> str | None:
        """Why ``host`` resolving to ``ip`` may not be reached (None: it may)."""
        if self.allows_name(host) or any(ip in net for net in self.allowed_networks):
            return None
        return blocked_reason(ip)


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _resolver() -> ThreadPoolExecutor:
    # getaddrinfo has no timeout: it runs on threads of its own, waited for with one. Created on
    # first use (nothing at import time); the threads are daemons of the pool.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_RESOLVERS, thread_name_prefix="webhook-dns")
        return _executor


def _getaddrinfo(host: str, port: int) -> list[IPAddress]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone
        if address not in found:
            found.append(address)
    return found


def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> list[IPAddress]:
    """The addresses ``host`` resolves to, waiting at most ``timeout`` seconds.

    Raises:
        Unresolvable: no answer, an error, or no answer in time.
    """
    future = _resolver().submit(_getaddrinfo, host, port)
    try:
        addresses = future.result(timeout=timeout)
    except FutureTimeout as exc:
        raise Unresolvable(f"{host} did not resolve within {timeout:g} s") from exc
    except (OSError, UnicodeError, ValueError) as exc:
        raise Unresolvable(f"{host} does not resolve ({exc})") from exc
    if not addresses:
        raise Unresolvable(f"{host} resolves to no address")
    return addresses


@dataclass(frozen=True)
class Destination:
    """A checked URL and the address to connect to for it."""

    url: httpx.URL
    ip: IPAddress

    def pinned(self) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """``(url, headers, extensions)`` that reach :attr:`ip` while naming the original host.

        The URL's host becomes the checked address; ``Host`` and (for https) the TLS server name
        stay the original host's, so virtual hosting and certificate checks work as before.
        """
        host = self.url.host
        headers = {"host": host if self.url.port is None else f"{_bracketed(host)}:{self.url.port}"}
        extensions: dict[str, Any] = {}
        if self.url.scheme == "https":
            extensions["sni_hostname"] = host
        return self.url.copy_with(host=str(self.ip)), headers, extensions


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse(url: str) -> httpx.URL:
    """``url`` as httpx reads it, if it is an absolute http(s) URL with a host.

    Raises:
        DestinationRefused: anything else.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise DestinationRefused(f"not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DestinationRefused("not an absolute http(s) URL")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _judge(parsed: httpx.URL, policy: EgressPolicy, addresses: list[IPAddress]) -> Destination:
    # Every address must be allowed, not only the first: a host may answer with a public and a
    # private address, and a client may use either.
    for address in addresses:
        refusal = policy.refusal(parsed.host, address)
        if refusal is not None:
            raise DestinationRefused(refusal)
    return Destination(parsed, addresses[0])


def _named(parsed: httpx.URL, policy: EgressPolicy) -> None:
    if _host_key(parsed.host) in METADATA_NAMES and not policy.allows_name(parsed.host):
        raise DestinationRefused(f"{parsed.host} is a cloud metadata service")


def check(url: str, policy: EgressPolicy, *, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> Destination:
    """Resolve ``url``'s host and check every address it resolves to.

    Raises:
        DestinationRefused: not an http(s) URL, a metadata name, an address that is not
            allowed, or (as :class:`Unresolvable`) no address at all.
    """
    parsed = parse(url)
    _named(parsed, policy)
    return _judge(parsed, policy, resolve(parsed.host, _port(parsed), timeout))


async def check_async(
    url: str, policy: EgressPolicy, *, timeout: float = RESOLVE_TIMEOUT_SECONDS
) -> Destination:
    """:func:`check` for async code: the lookup runs on the resolver's threads, awaited."""
    parsed = parse(url)
    _named(parsed, policy)
    lookup = asyncio.get_running_loop().run_in_executor(_resolver(), _getaddrinfo, parsed.host, _port(parsed))
    try:
        addresses = await asyncio.wait_for(lookup, timeout)
    except TimeoutError as exc:
        raise Unresolvable(f"{parsed.host} did not resolve within {timeout:g} s") from exc
    except (OSError, UnicodeError, ValueError) as exc:
        raise Unresolvable(f"{parsed.host} does not resolve ({exc})") from exc
    if not addresses:
        raise Unresolvable(f"{parsed.host} resolves to no address")
    return _judge(parsed, policy, addresses)


def redact(url: str) -> str:
    """``url`` with any user name and password in it replaced by ``***`` (for answers and logs)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<invalid URL>" if "@" in url else url
    if not parsed.userinfo:
        return url
    return str(parsed.copy_with(userinfo=b"***"))


__all__ = [
    "METADATA_NAMES",
    "Destination",
    "DestinationRefused",
    "EgressPolicy",
    "Unresolvable",
    "blocked_reason",
    "check",
    "check_async",
    "parse",
    "redact",
    "resolve",
]
