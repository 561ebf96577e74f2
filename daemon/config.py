"""ferryd's command line and the guest addressing it derives.

Defaults follow passt (REFERENCE.md, "Guest link conventions"): the guest
gets the address, prefix and gateway of the host interface that carries the
host's default route, the link MTU is 65520 (the largest a tap takes, so
bulk data crosses the link in few frames), and DNS servers come from the
host's resolv.conf. Every one of these can be overridden, and a family with
neither a host default nor an explicit address is simply disabled.

Gateway mapping: passt maps the guest's connections to the gateway address
to the host itself. ferry does not by default: the gateway address reaches
the real gateway, so nothing listening on the host's loopback is exposed to
the guest unless asked for with ``--map-gw``.
"""

import argparse
import logging
import textwrap
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface
from pathlib import Path

from ferryd.flows.portspec import PortForward, parse_port_spec
from ferryd.http_metrics import MetricsAddress, parse_address
from ferryd.link import Ip4Config, Ip6Config, LinkConfig
from ferryd.migration.session import PRECOPY_QUIET
from ferryd.wire.ethernet import format_mac, parse_mac
from ferryd.wire.ip import IpAddress

log = logging.getLogger("ferryd.config")

DEFAULT_MAC = "9a:55:9a:55:9a:55"
DEFAULT_MTU = 65520
AF_INET, AF_INET6 = 2, 10


#: What ``--help`` says of QEMU's stream mode (the README shows the same lines).
STREAM_HELP = """\
QEMU (stream): ferryd listens, QEMU connects; each frame travels behind its
4-byte big-endian length (passt's default mode). For example:
  ferryd --socket /run/ferry/vm.sock --control /run/ferry/vm.ctl
  qemu-system-x86_64 ... -netdev stream,id=n0,server=off,addr.type=unix,\\
      addr.path=/run/ferry/vm.sock,reconnect-ms=1000 \\
      -device virtio-net-pci,netdev=n0
One QEMU is served at a time; a QEMU that reconnects is served again.
Migration works as in tap mode: the target ferryd (--incoming) gets its
own --socket, for the target QEMU."""

#: What ``--help`` says of QEMU's vhost-user mode (the README shows the same lines).
VHOST_USER_HELP = """\
QEMU (vhost-user): with --vhost-user, ferryd is QEMU's vhost-user-net
back-end on --socket and reads and writes the guest's queues in its RAM,
which QEMU must therefore share: a memfd memory backend with share=on.
For example:
  ferryd --vhost-user --socket /run/ferry/vm.sock --control /run/ferry/vm.ctl
  qemu-system-x86_64 ... -m 1G \\
      -object memory-backend-memfd,id=mem0,size=1G,share=on \\
      -numa node,memdev=mem0 \\
      -chardev socket,id=vhost0,path=/run/ferry/vm.sock,reconnect-ms=1000 \\
      -netdev vhost-user,id=n0,chardev=vhost0 -device virtio-net-pci,netdev=n0
One QEMU is served at a time; a QEMU that reconnects gets a fresh session.
QEMU migrates ferryd's state itself (vhost-user device state): the target
ferryd is started with the same command line, without --incoming."""


class ConfigError(Exception):
    """The configuration asked for is impossible: the operator's to fix."""


@dataclass(frozen=True)
class HostRoute:
    """The host's default route of one family and the address it leaves from."""

    address: IpAddress
    prefixlen: int
    gateway: IpAddress


@dataclass
class Options:
    """Parsed command line (argparse namespace, typed)."""

    netns: str | None
    """Tap mode: the guest's namespace (None with --socket)."""
    tap: str
    control: str | None
    config_net: bool
    socket: str | None = None
    """QEMU's stream netdev: the Unix socket ferryd listens on (None in tap mode)."""
    vhost_user: bool = False
    """With --socket: QEMU's vhost-user-net back-end instead of its stream netdev."""
    addresses: list[str] = field(default_factory=list)
    interface: str | None = None
    """Take the host defaults from this interface rather than the default route's."""
    gateways: list[str] = field(default_factory=list)
    mtu: int = DEFAULT_MTU
    mac: str = DEFAULT_MAC
    dns: list[str] = field(default_factory=list)
    only4: bool = False
    only6: bool = False
    map_gw: bool = False
    no_link_local: bool = False
    udp_forwards: list[list[PortForward]] = field(default_factory=list)
    tcp_forwards: list[list[PortForward]] = field(default_factory=list)
    max_flows: int = 16384
    max_queue: int = 0
    verbose: int = 0
    quiet: bool = False
    incoming: bool = False
    repair_socket: str | None = None
    repair_listen: str | None = None
    linger: float = 30.0
    precopy_quiet: float = PRECOPY_QUIET
    runas: str | None = None
    tap_fd: int | None = None
    one_off: bool = False
    """With --socket: exit 0 once the first QEMU's connection has ended."""
    pid_file: str | None = None
    daemonize: bool = False
    log_file: str | None = None
    metrics: MetricsAddress | None = None
    """--metrics: serve the Prometheus metrics over HTTP there (ferryd.http_metrics)."""
    pcap: str | None = None
    """--pcap: write the guest's frames to this file (ferryd.pcap)."""


def _mtu(text: str) -> int:
    # argparse shows an ArgumentTypeError's own message; a ValueError only
    # becomes "invalid _mtu value", which names neither the rule nor the fix.
    if not text.isdigit() or not 68 <= int(text) <= 65520:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the MTU must be a number from 68 (RFC 791) to 65520 (the tap maximum)"
        )
    return int(text)


def _max_queue(text: str) -> int:
    # SO_RCVBUF/SO_SNDBUF take an int that the kernel doubles (socket(7)).
    if not text.isdigit() or not (int(text) == 0 or 4096 <= int(text) <= 1 << 30):
        raise argparse.ArgumentTypeError(
            f"{text!r}: --max-queue must be 0 (off) or a byte count from 4096 to 2^30"
        )
    return int(text)


def _port_spec(text: str) -> list[PortForward]:
    try:
        return parse_port_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _metrics_address(text: str) -> MetricsAddress:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_operations(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("operations")
    o.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="ADDR",
        help="serve the Prometheus metrics (what `ferryctl metrics` prints) over HTTP at "
        "http://ADDR/metrics; ADDR is HOST:PORT (127.0.0.1:9650), [IPV6]:PORT or an "
        "absolute Unix socket path (mode 0600)",
    )
    o.add_argument(
        "--pcap",
        metavar="FILE",
        help="write every frame the guest sends and receives to FILE (created, mode 0600) "
        "in pcap format, for Wireshark or tshark; a debugging aid: one write() per frame, "
        "and a disk that cannot keep up ends the capture, not the traffic",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ferryd",
        description=textwrap.fill(
            "User-mode networking for a guest (a network namespace's tap device, or "
            "a VM's QEMU on a Unix socket): the guest's frames become ordinary host "
            "sockets. ARP, NDP, DHCP and DHCPv6 are answered locally. By default the "
            "guest gets the address, prefix and gateway of the host's default-route "
            "interface, MTU 65520 and the host's DNS servers. Two modes: --netns "
            "(a tap in that namespace) or --socket (QEMU's stream netdev, or with "
            "--vhost-user its vhost-user-net device)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=STREAM_HELP
        + "\n\n"
        + VHOST_USER_HELP
        + "\n\n"
        + textwrap.fill(
            "Port specs (-t, -u): PORT, HOSTPORT:GUESTPORT, ranges A-B or A-B:C-D, "
            "comma-separated lists, an optional bind address ADDR/PORTS, or 'none'. "
            "ICMP echo uses unprivileged ping sockets: the daemon's group must be in "
            "net.ipv4.ping_group_range. Readiness: `ferryctl --control PATH status "
            "--wait 10`. Exit status: 0 stopped by SIGTERM/SIGINT or at the end of a "
            "migrated source's linger, or (--one-off) once QEMU quit; 1 a runtime "
            "failure (a socket or directory that cannot be made, a port that cannot be "
            "bound); 2 a usage or configuration "
            "error. Start-up failures are one line; -v adds the traceback."
        ),
    )
    g = p.add_argument_group("guest attachment (one of --netns and --socket)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--netns",
        metavar="PATH",
        help="tap mode: the guest's network namespace, a path such as /run/netns/NAME, or a name",
    )
    mode.add_argument(
        "--socket",
        metavar="PATH",
        help="QEMU mode: listen on this Unix socket (mode 0600) for QEMU's "
        "`-netdev stream` (see below); host sockets live in ferryd's own namespace",
    )
    g.add_argument(
        "--vhost-user",
        action="store_true",
        help="with --socket: be QEMU's vhost-user-net back-end (`-netdev vhost-user`; "
        "the guest's RAM must be a shared memfd, see below) rather than its stream netdev",
    )
    g.add_argument(
        "--tap",
        metavar="NAME",
        help="tap device in that namespace; created if missing (default: tap0)",
    )
    g.add_argument(
        "--config-net",
        action="store_true",
        help="assign the guest's addresses and default routes on the tap "
        "(like pasta --config-net); without it the guest uses DHCP/NDP",
    )
    g.add_argument(
        "--tap-fd",
        type=int,
        metavar="N",
        help="use descriptor N, /dev/net/tun opened by the caller inside the guest's "
        "namespace, and attach it to the existing tap --tap (owned by ferryd's user or "
        "group): no setns, no capability needed. Socket activation (LISTEN_FDS=1) "
        "does the same with descriptor 3. The tap must be configured beforehand; "
        "--config-net is refused",
    )
    g.add_argument("--control", metavar="PATH", help="control socket for ferryctl")

    a = p.add_argument_group("guest addressing (defaults: the host's)")
    a.add_argument(
        "-a",
        "--address",
        dest="addresses",
        action="append",
        default=[],
        metavar="ADDR[/PREFIX]",
        help="guest address, once per family",
    )
    a.add_argument(
        "-g",
        "--gateway",
        dest="gateways",
        action="append",
        default=[],
        metavar="ADDR",
        help="guest gateway, once per family "
        "(IPv6: a link-local address; default: the host's if link-local, "
        "else derived from ferryd's MAC)",
    )
    a.add_argument(
        "--interface",
        metavar="NAME",
        help="take the default address, prefix and gateway from host interface NAME (its "
        "global address and the default route through it) rather than from the interface "
        "carrying the host's default route (passt's --interface)",
    )
    a.add_argument(
        "-m", "--mtu", type=_mtu, default=DEFAULT_MTU, help=f"link MTU (default {DEFAULT_MTU})"
    )
    a.add_argument(
        "-M",
        "--mac",
        default=DEFAULT_MAC,
        help=f"ferryd's own MAC address on the guest link (default {DEFAULT_MAC})",
    )
    a.add_argument(
        "-D",
        "--dns",
        action="append",
        default=[],
        metavar="ADDR",
        help="DNS server to announce (repeatable; 'none' for none; "
        "default: the host's non-loopback resolv.conf servers)",
    )
    fam = a.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4-only", dest="only4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6-only", dest="only6", action="store_true", help="IPv6 only")
    a.add_argument(
        "--map-gw",
        action="store_true",
        help="send the guest's traffic for the gateway address to the host "
        "itself (127.0.0.1 / ::1), as passt does by default; off by default "
        "so host-local services are not exposed to the guest. Without it the "
        "guest's traffic to the host itself (127.0.0.0/8, ::1, unspecified, and "
        "every address of ferryd's host namespace) is refused with a TCP RST or "
        "ICMP administratively prohibited",
    )
    a.add_argument(
        "--no-link-local",
        action="store_true",
        help="also refuse the guest's traffic to link-local destinations "
        "(169.254.0.0/16, fe80::/10), such as a cloud metadata service at "
        "169.254.169.254",
    )

    f = p.add_argument_group("flows")
    f.add_argument(
        "-t",
        "--tcp-ports",
        dest="tcp_forwards",
        action="append",
        default=[],
        type=_port_spec,
        metavar="SPEC",
        help="forward host TCP ports to the guest (repeatable); the guest sees "
        "the peer's own address as the source",
    )
    f.add_argument(
        "-u",
        "--udp-ports",
        dest="udp_forwards",
        action="append",
        default=[],
        type=_port_spec,
        metavar="SPEC",
        help="forward host UDP ports to the guest (repeatable)",
    )
    f.add_argument(
        "--max-flows",
        type=int,
        default=16384,
        help="flows per protocol before new ones are refused, with a log line "
        "(default 16384); all protocols together are also held to what RLIMIT_NOFILE "
        "allows, less a reserve (ferryctl status: descriptors)",
    )
    f.add_argument(
        "--max-queue",
        type=_max_queue,
        default=0,
        metavar="BYTES",
        help="cap every TCP socket's receive and send buffers at BYTES each, always "
        "(and the window offered to the guest with them), so that what a busy "
        "connection carries across a migration's freeze is bounded even without a "
        "pre-copy (QEMU's migrations have none); 0, the default: the kernel's "
        "autotuning, capped only from a pre-copy's start",
    )
    m = p.add_argument_group("migration")
    m.add_argument(
        "--incoming",
        action="store_true",
        help="start as a migration target: attach to the guest's existing tap "
        "(queue disabled), configure nothing, and wait for `ferryctl migrate` to "
        "hand over a stream; addresses, flows and forwards come from the source",
    )
    m.add_argument(
        "--repair-socket",
        metavar="PATH",
        help="ferry-repair's listening socket (TCP_REPAIR is toggled through it; "
        "ferryd itself holds no capability). Needed to migrate TCP connections",
    )
    m.add_argument(
        "--repair-listen",
        metavar="PATH",
        help="listen on PATH for a repair helper that connects (passt-repair style: "
        "`passt-repair PATH`) instead of connecting to one",
    )
    m.add_argument(
        "--linger",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after handing its guest over, keep the frozen sockets (dropping what "
        "reaches them, so the source never resets a connection the target now owns) "
        "this long, then exit 0 (default 30; SIGTERM ends it earlier)",
    )
    # Hidden: how long a connection must have been quiet for a pre-copy to
    # take it (ferryd.migration.session). Tests pass 0, so that they wait
    # for a condition (connections established) rather than for time.
    m.add_argument("--precopy-quiet", type=float, default=PRECOPY_QUIET, help=argparse.SUPPRESS)
    p.add_argument(
        "--runas",
        metavar="USER[:GROUP]",
        help="when started as root, become this user (name or uid) once set up "
        "(default: nobody); a non-root caller can only name itself. ferry-repair "
        "must allow that uid (--allow-uid) for migration",
    )
    r = p.add_argument_group("process (passt's conventions, for supervisors such as libvirt)")
    r.add_argument(
        "--one-off",
        action="store_true",
        help="with --socket: exit 0 once the first QEMU's connection has ended (QEMU quit), "
        "rather than wait for it to reconnect; not while a migration source hands over "
        "(its linger decides)",
    )
    r.add_argument(
        "--pid",
        dest="pid_file",
        metavar="FILE",
        help="write ferryd's pid to FILE (created or truncated when ferryd starts) once it "
        "is ready; removed at exit",
    )
    r.add_argument(
        "--daemonize",
        action="store_true",
        help="go to the background once ready: the starting process exits 0 when ferryd "
        "serves (the --pid file written), or with ferryd's own status if it fails to start; "
        "standard input and output then become /dev/null, and standard error too unless "
        "--log-file is given",
    )
    r.add_argument(
        "--log-file",
        metavar="FILE",
        help="append the log to FILE (created with mode 0600) instead of standard error",
    )
    _add_operations(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-vv for per-frame debugging)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.socket is not None:
        for given, name in (
            (ns.tap, "--tap"),
            (ns.tap_fd, "--tap-fd"),
            (ns.config_net, "--config-net"),
        ):
            if given not in (None, False):
                parser.error(f"argument {name}: tap mode only (--netns), not allowed with --socket")
    if ns.vhost_user:
        if ns.socket is None:
            parser.error("argument --vhost-user: needs --socket PATH (QEMU's vhost-user socket)")
        if ns.incoming:
            parser.error(
                "argument --incoming: not with --vhost-user (QEMU's device state makes"
                " ferryd the target: start it with the same command line as the source)"
            )
    if ns.one_off and ns.socket is None:
        parser.error("argument --one-off: needs --socket PATH (QEMU's connection ends it)")
    if ns.tap is None:
        ns.tap = "tap0"
    return Options(**vars(ns))


def netns_path(name_or_path: str) -> str:
    return name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"


def host_default_routes(interface: str | None = None) -> dict[int, HostRoute]:
    """The host's default route per family, with the source interface address.

    Read through rtnetlink (pyroute2). A family without a default route, or
    whose interface has no global address, is absent from the result. With
    ``interface``, only default routes through that interface count.
    """
    from pyroute2 import IPRoute

    found: dict[int, HostRoute] = {}
    with IPRoute() as ipr:
        only: int | None = None
        if interface is not None:
            indexes = ipr.link_lookup(ifname=interface)
            if not indexes:
                raise ConfigError(f"--interface {interface}: no such interface on this host")
            only = indexes[0]
        for family in (AF_INET, AF_INET6):
            for route in ipr.get_default_routes(family=family):
                gateway, oif = route.get("RTA_GATEWAY"), route.get("RTA_OIF")
                if gateway is None or oif is None or only not in (None, oif):
                    continue
                for addr in ipr.get_addr(family=family, index=oif):
                    if addr["scope"] != 0:  # RT_SCOPE_UNIVERSE only
                        continue
                    found[family] = HostRoute(
                        ip_address(addr.get("IFA_ADDRESS")),
                        int(addr["prefixlen"]),
                        ip_address(gateway),
                    )
                    break
                if family in found:
                    break
    return found


def resolv_conf_dns(path: str = "/etc/resolv.conf") -> list[IpAddress]:
    servers: list[IpAddress] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return servers
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                servers.append(ip_address(parts[1].split("%")[0]))
            except ValueError:
                continue
    return servers


def link_local_from_mac(mac: bytes) -> IPv6Address:
    """Modified EUI-64 interface identifier (RFC 4291 appendix A) in fe80::/64."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return IPv6Address(b"\xfe\x80" + b"\x00" * 6 + eui)


def make_link_config(
    opts: Options,
    routes: dict[int, HostRoute] | None = None,
    host_dns: list[IpAddress] | None = None,
) -> LinkConfig:
    """Combine overrides with host defaults; raise ConfigError if impossible."""
    try:
        mac = parse_mac(opts.mac)
    except ValueError as exc:
        raise ConfigError(f"-M: {exc}") from None
    if mac[0] & 1:
        raise ConfigError(f"-M: {format_mac(mac)} is a multicast address")
    routes = host_default_routes(opts.interface) if routes is None else routes
    host_dns = resolv_conf_dns() if host_dns is None else host_dns

    explicit: dict[int, tuple[IpAddress, int | None]] = {}
    for text in opts.addresses:
        try:
            iface = ip_interface(text)
        except ValueError:
            raise ConfigError(f"-a: {text!r} is not an address[/prefix]") from None
        prefix = iface.network.prefixlen if "/" in text else None
        explicit[iface.version] = (iface.ip, prefix)
    gateways: dict[int, IpAddress] = {}
    for text in opts.gateways:
        try:
            gw = ip_address(text)
        except ValueError:
            raise ConfigError(f"-g: {text!r} is not an address") from None
        if gw.version == 6 and not gw.is_link_local:
            raise ConfigError(
                f"-g: {gw} is not link-local: IPv6 routers advertise from fe80::/10 "
                "(RFC 4861 §6.1.2)"
            )
        gateways[gw.version] = gw

    dns: list[IpAddress]
    if opts.dns == ["none"]:
        dns = []
    elif opts.dns:
        try:
            dns = [ip_address(d) for d in opts.dns]
        except ValueError as exc:
            raise ConfigError(f"-D: {exc}") from None
    else:
        dns = [d for d in host_dns if not d.is_loopback]

    ipv4 = None if opts.only6 else _ip4(explicit.get(4), gateways.get(4), routes.get(AF_INET), dns)
    ipv6 = None
    if not opts.only4:
        if opts.mtu < 1280:
            if opts.only6:
                raise ConfigError("IPv6 needs an MTU of at least 1280 (RFC 8200 §5)")
            log.warning("MTU %d is below IPv6's minimum of 1280: IPv6 disabled", opts.mtu)
        else:
            ipv6 = _ip6(explicit.get(6), gateways.get(6), routes.get(AF_INET6), dns, mac)
    if ipv4 is None and ipv6 is None:
        where = "the host" if opts.interface is None else f"--interface {opts.interface}"
        raise ConfigError(
            f"no guest address: {where} has no default route with an address, "
            "and none was given with -a"
        )
    return LinkConfig(mac=mac, mtu=opts.mtu, ipv4=ipv4, ipv6=ipv6)


def _ip4(
    explicit: tuple[IpAddress, int | None] | None,
    gateway: IpAddress | None,
    route: HostRoute | None,
    dns: list[IpAddress],
) -> Ip4Config | None:
    if explicit is None and route is None:
        log.info("IPv4 disabled: no host default route and no -a address")
        return None
    addr = explicit[0] if explicit else route.address  # type: ignore[union-attr]
    prefix = (explicit[1] if explicit else None) or (route.prefixlen if route else 24)
    gw = gateway or (route.gateway if route else None)
    if gw is None:
        raise ConfigError("IPv4: no gateway (the host has no IPv4 default route): use -g")
    assert isinstance(addr, IPv4Address) and isinstance(gw, IPv4Address)
    if gw == addr:
        raise ConfigError(f"IPv4: the gateway {gw} is the guest's own address")
    return Ip4Config(addr, prefix, gw, tuple(d for d in dns if isinstance(d, IPv4Address)))


def _ip6(
    explicit: tuple[IpAddress, int | None] | None,
    gateway: IpAddress | None,
    route: HostRoute | None,
    dns: list[IpAddress],
    mac: bytes,
) -> Ip6Config | None:
    if explicit is None and route is None:
        log.info("IPv6 disabled: no host default route and no -a address")
        return None
    addr = explicit[0] if explicit else route.address  # type: ignore[union-attr]
    prefix = (explicit[1] if explicit else None) or (route.prefixlen if route else 64)
    gw = gateway
    if gw is None and route is not None and route.gateway.is_link_local:
        gw = route.gateway
    if gw is None:
        gw = link_local_from_mac(mac)
    assert isinstance(addr, IPv6Address) and isinstance(gw, IPv6Address)
    return Ip6Config(addr, prefix, gw, tuple(d for d in dns if isinstance(d, IPv6Address)))
