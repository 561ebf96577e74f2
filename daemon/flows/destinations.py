"""Where the guest may send: one policy for every protocol, and what a refusal costs.

Theory of operation
-------------------
ferryd turns each new guest conversation into a host socket ``connect()``-ed
to the destination the guest named. A host socket reaches whatever the host
can reach, including the host itself: a guest that names 127.0.0.1, ::1,
::ffff:127.0.0.1, an unspecified address (Linux connects 0.0.0.0 and :: to
the loopback) or any address the host owns would talk to services that
listen on the host for local users only. So every new outbound flow (TCP,
UDP, ICMP echo) and every flow a migration restores asks
:meth:`DestinationPolicy.route` first, and gets either the address to
connect to or a :class:`Refusal`:

- ``--map-gw`` (off by default) maps the guest's gateway address to the
  host's loopback, passt's convention: that mapping is the one documented
  way for a guest to reach the host, and it is decided before anything is
  refused.
- Multicast and broadcast destinations (the limited broadcast, the guest
  subnet's) are group destinations: dropped without an answer (RFC 1812
  §4.3.2.7: no ICMP error about a datagram sent to a group).
- Refused, and answered as a router's filter would (TCP RST, ICMP "
  administratively prohibited"): 0.0.0.0/8 and ::, 127.0.0.0/8 and ::1,
  the host's own addresses, and with ``--no-link-local`` 169.254.0.0/16
  and fe80::/10 (cloud metadata services live at 169.254.169.254). An
  IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address
  it stands for, since the kernel sends to that one.

The host's own addresses are those of the network namespace ferryd's host
sockets live in (ferryd.host_addresses reads them at start and again
whenever the kernel announces an address change). With passt's addressing
the guest's own address is one of them, so a guest frame sent to its own
address is refused too: it would reach the host.

:class:`Destinations` is what the flows hold: the current policy (replaced
when the link or the host's addresses change) plus the accounting of
refusals, counted per protocol, logged through a :class:`LogThrottle` and
answered within a token bucket (:class:`RateLimit`), so a guest cannot make
ferryd emit errors at line rate (RFC 4443 §2.4 (f) asks this of ICMPv6
errors; Linux's own defaults, net.ipv4.icmp_msgs_per_sec 1000 and
icmp_msgs_burst 50, are the numbers used).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ferryd.flows.common import LOOPBACK4, LOOPBACK6, gateway_of
from ferryd.link import LinkConfig
from ferryd.logthrottle import LogThrottle
from ferryd.wire.ip import IpAddress

__all__ = [
    "DestinationPolicy",
    "Destinations",
    "RateLimit",
    "Refusal",
    "endpoint_text",
    "is_group_destination",
]

log = logging.getLogger("ferryd.destinations")

_BROADCAST4 = IPv4Address("255.255.255.255")
_THIS_NETWORK4 = IPv4Network("0.0.0.0/8")  # RFC 1122 §3.2.1.3: never a destination
_LINK_LOCAL4 = IPv4Network("169.254.0.0/16")  # RFC 3927
_LINK_LOCAL6 = IPv6Network("fe80::/10")  # RFC 4291 §2.5.6

#: Linux's defaults for ICMP errors (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst).
ANSWERS_PER_SECOND = 1000.0
ANSWER_BURST = 50


class Refusal(enum.Enum):
    """Why a destination is not used; the value is what logs and counters say."""

    GROUP = "multicast or broadcast"
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    HOST = "the host's own address"
    LINK_LOCAL = "link-local (--no-link-local)"

    @property
    def answered(self) -> bool:
        """Whether the guest is told: never about a group destination (RFC 1812 §4.3.2.7)."""
        return self is not Refusal.GROUP


def is_group_destination(link: LinkConfig, dst: IpAddress) -> bool:
    """Multicast, or broadcast (limited, or the guest subnet's)."""
    if dst.is_multicast:
        return True
    if isinstance(dst, IPv4Address):
        if dst == _BROADCAST4:
            return True
        cfg = link.ipv4
        if cfg is not None and cfg.prefixlen <= 30:
            host_bits = (1 << (32 - cfg.prefixlen)) - 1
            return int(dst) == int(cfg.address) | host_bits
    return False


def endpoint_text(addr: IpAddress, port: int | None = None) -> str:
    """``addr`` (``[addr]:port`` / ``addr:port``) for a message; IPv4-mapped ones
    written ::ffff:a.b.c.d, the way an operator would look for them."""
    text = str(addr)
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        text = f"::ffff:{addr.ipv4_mapped}"
    if port is None:
        return text
    return f"[{text}]:{port}" if addr.version == 6 else f"{text}:{port}"


def _judged(addr: IpAddress) -> IpAddress:
    """The address the kernel really sends to: an IPv4-mapped one's IPv4 address."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Pure: which destinations a guest may reach, as of one configuration."""

    link: LinkConfig
    map_gateway: bool = False
    refuse_link_local: bool = False
    host_addresses: frozenset[IpAddress] = frozenset()
    """Addresses of ferryd's host namespace (IPv4-mapped ones stored as IPv4)."""

    def with_host_addresses(self, addresses: frozenset[IpAddress]) -> DestinationPolicy:
        return replace(self, host_addresses=frozenset(_judged(a) for a in addresses))

    def is_host_itself(self, addr: IpAddress) -> bool:
        """Whether a socket sending to ``addr`` would reach this host."""
        return self._host_refusal(_judged(addr)) is not None

    def _host_refusal(self, a: IpAddress) -> Refusal | None:
        """Why a socket sending to ``a`` (judged) would reach this host, if it would."""
        if a.is_unspecified or (isinstance(a, IPv4Address) and a in _THIS_NETWORK4):
            return Refusal.UNSPECIFIED
        if a.is_loopback:
            return Refusal.LOOPBACK
        if a in self.host_addresses:
            return Refusal.HOST
        return None

    def route(self, dst: IpAddress) -> IpAddress | Refusal:
        """Where a new flow the guest sends to ``dst`` goes, or why it does not."""
        if self.map_gateway and dst == gateway_of(self.link, dst.version):
            return LOOPBACK4 if isinstance(dst, IPv4Address) else LOOPBACK6
        a = _judged(dst)  # an IPv4-mapped group or host address is one too
        if is_group_destination(self.link, a):
            return Refusal.GROUP
        why = self._host_refusal(a)
        if why is not None:
            return why
        if self.refuse_link_local and (a in _LINK_LOCAL4 or a in _LINK_LOCAL6):
            return Refusal.LINK_LOCAL
        return dst


@dataclass(slots=True)
class RateLimit:
    """A token bucket: ``rate`` events a second on average, ``burst`` at once. Pure."""

    rate: float
    burst: int
    _tokens: float = field(init=False)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)

    def allow(self, now: float) -> bool:
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class RefusalCounters:
    """New flows refused, by protocol, and refusals left unanswered (for the registry)."""

    tcp: int = 0
    udp: int = 0
    icmp: int = 0
    unanswered: int = 0
    """Refusals not answered because the answers' rate limit was reached."""

    def count(self, proto: str) -> None:
        """One more refusal of a new *proto* flow ("tcp", "udp" or "icmp")."""
        setattr(self, proto, getattr(self, proto) + 1)


class Destinations:
    """The policy the flows apply, and the accounting of what it refuses.

    One per daemon: the policy is replaced when the guest's link changes (a
    migration target learns it from the stream) or the host's addresses
    change; the counters last as long as the process.
    """

    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy
        self.counters = RefusalCounters()
        self._limit = RateLimit(ANSWERS_PER_SECOND, ANSWER_BURST)
        self._throttle = LogThrottle(log)

    def set_link(self, link: LinkConfig) -> None:
        self.policy = replace(self.policy, link=link)
        for config in (link.ipv4, link.ipv6):
            for dns in () if config is None else config.dns:
                why = self.policy.route(dns)
                if isinstance(why, Refusal):
                    log.warning(
                        "the guest is told to use DNS server %s, which it may not reach (%s): "
                        "give another with -D, or the gateway with --map-gw",
                        dns,
                        why.value,
                    )

    def set_host_addresses(self, addresses: frozenset[IpAddress]) -> None:
        self.policy = self.policy.with_host_addresses(addresses)

    def refuse(
        self, proto: str, src: IpAddress, dst: IpAddress, port: int, why: Refusal, now: float
    ) -> bool:
        """Count and log a refused new flow; True if the guest is to be answered now."""
        if not why.answered:
            return False
        self.counters.count(proto)
        where = endpoint_text(dst, port)
        self._throttle.warning(
            "refused", now, "refused guest %s %s -> %s: %s", proto, src, where, why.value
        )
        return self.may_answer(now)

    def may_answer(self, now: float) -> bool:
        """True if a refusal may be answered now; counted if not.

        Answers are rate-limited as RFC 4443 §2.4 (f) asks of ICMPv6 errors
        (and Linux does for both families), so a guest cannot make ferryd
        send at line rate.
        """
        if self._limit.allow(now):
            return True
        self.counters.unanswered += 1
        return False
