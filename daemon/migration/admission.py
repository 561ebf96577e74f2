"""Which restored flows and listeners a migration target accepts.

A migration stream is the source's word, and the source may be
compromised or the stream forged: restoring it blindly would give the
guest what the target's own policy refuses, say a TCP connection to a
service on the target's loopback (issue 9, item 10). So the target holds
every record to the same destination rules a guest's new flow meets there
(:class:`ferryd.flows.destinations.DestinationPolicy`, built from the
target's own options and addresses and the link the stream announced),
before the record touches anything. A record that breaks them is a
:class:`StreamError`: the target discards what it restored so far and
answers the migration with that error, and the source rolls back.

What is checked, per record:

- TCP, UDP and ICMP flows: the remote as the guest sees it must be a
  destination the policy routes (not the host itself, not a group, not
  link-local under ``--no-link-local``). The guest-side address of a
  restored flow is the guest's: not checked here.
- A TCP flow's socket (its record's kernel state, or the socket itself
  when handed over: :func:`check_connected`) must be connected to where
  the target itself would connect it: the remote the guest sees, or, for the gateway under
  ``--map-gw``, the host. Inbound flows (accepted on a ``-t`` listener)
  record the peer that connected in as their remote, shown as is; only a
  peer on the host itself is shown as the gateway (flows.common,
  peer_as_seen_by_guest), and such a flow's socket is connected to the
  host. The target accepts that one only with ``--map-gw``, where the
  gateway stands for the host anyway; without it a stream cannot tell a
  host-local client of a forwarded port from a connection forged to a
  host-local service, so it is refused (the migration rolls back).
- Listeners: the bind address must be every address (None or
  unspecified), loopback, or one of the target's own addresses: a
  listener is opened on the target host, and an address it does not own
  cannot be what an operator forwarded.
"""

from __future__ import annotations

from ferryd.flows.common import gateway_of
from ferryd.flows.destinations import DestinationPolicy, Refusal, endpoint_text
from ferryd.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    StreamError,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.wire.ip import IpAddress

__all__ = ["Admission", "check_connected", "check_record"]


def _check_remote(
    policy: DestinationPolicy, what: str, addr: IpAddress, port: int | None
) -> IpAddress:
    """Where the policy routes ``addr``; :class:`StreamError` if it refuses it."""
    verdict = policy.route(addr)
    if isinstance(verdict, Refusal):
        raise StreamError(
            f"the stream restores a {what} to {endpoint_text(addr, port)}, a destination this "
            f"ferryd refuses ({verdict.value}): migration refused"
        )
    return verdict


def check_record(policy: DestinationPolicy, rec: FlowRecord) -> None:
    """Raise :class:`StreamError` if restoring ``rec`` would break ``policy``."""
    if isinstance(rec, TcpFlowRecord):
        routed = _check_remote(policy, "TCP flow", rec.remote_addr, rec.remote_port)
        k = rec.kernel
        if k is None:
            return  # in its handshake (reset, not restored), or handed over: check_connected
        _check_connected(policy, rec, routed, k.remote_addr, k.remote_port)
    elif isinstance(rec, UdpFlowRecord):
        _check_remote(policy, "UDP flow", rec.remote_addr, rec.remote_port)
    elif isinstance(rec, IcmpFlowRecord):
        _check_remote(policy, "ICMP echo flow", rec.remote_addr, None)
    elif isinstance(rec, ListenerRecord):
        addr = rec.bind_addr
        if addr is None or addr.is_unspecified or addr.is_loopback:
            return
        if addr not in policy.host_addresses:
            raise StreamError(
                f"the stream opens a listener on {endpoint_text(addr, rec.host_port)}, which is "
                "not an address of this host: migration refused"
            )


def check_connected(
    policy: DestinationPolicy, rec: TcpFlowRecord, addr: IpAddress, port: int
) -> None:
    """Raise :class:`StreamError` unless a socket connected to ``addr``:``port`` is where
    this ferryd would connect ``rec`` (a socket handed over beside the stream: its
    record carries no kernel state to check, ferryd.migration.handover)."""
    routed = _check_remote(policy, "TCP flow", rec.remote_addr, rec.remote_port)
    _check_connected(policy, rec, routed, addr, port)


def _check_connected(
    policy: DestinationPolicy, rec: TcpFlowRecord, routed: IpAddress, addr: IpAddress, port: int
) -> None:
    host_shown_as_gateway = (
        policy.map_gateway
        and rec.remote_addr == gateway_of(policy.link, rec.remote_addr.version)
        and policy.is_host_itself(addr)
    )
    if addr not in (rec.remote_addr, routed) and not host_shown_as_gateway:
        raise StreamError(
            f"the stream restores a TCP flow the guest sees as "
            f"{endpoint_text(rec.remote_addr, rec.remote_port)} on a socket connected to "
            f"{endpoint_text(addr, port)}, which this ferryd would not "
            "connect it to: migration refused"
        )


class Admission:
    """:func:`check_record` (and :func:`check_connected`) over one stream, skipping the
    TCP flows it already admitted.

    A TCP flow's verdict depends only on the policy, the remote the guest
    sees and the remote its socket is connected to; a stream of a thousand
    connections names the same few, and the decoder hands out one address
    object per distinct address (records' address cache). So the last
    admitted triple is remembered by identity: the same objects give the
    same verdict, and a record with anything else is checked in full.
    """

    def __init__(self) -> None:
        self._admitted: tuple[DestinationPolicy, IpAddress, IpAddress | None] | None = None

    def check(self, policy: DestinationPolicy, rec: FlowRecord) -> None:
        """Raise :class:`StreamError` if restoring ``rec`` would break ``policy``."""
        if type(rec) is not TcpFlowRecord or (rec.kernel is None and not rec.handed_over):
            check_record(policy, rec)
            return
        # (Handed over: the remote the guest sees only, here; its socket's is
        # checked once it is in hand, check_connected.)
        connected = None if rec.kernel is None else rec.kernel.remote_addr
        last, remote = self._admitted, rec.remote_addr
        if last is not None and last[0] is policy and last[1] is remote and last[2] is connected:
            return
        check_record(policy, rec)
        self._admitted = (policy, remote, connected)

    def check_connected(
        self, policy: DestinationPolicy, rec: TcpFlowRecord, addr: IpAddress, port: int
    ) -> None:
        """:func:`check_connected`, skipping the triple last admitted (see the class)."""
        last, remote = self._admitted, rec.remote_addr
        if last is not None and last[0] is policy and last[1] is remote and last[2] is addr:
            return
        check_connected(policy, rec, addr, port)
        self._admitted = (policy, remote, addr)
