"""``ferry-passt``: passt's command line, translated into ferryd's, so that libvirt's (and
KubeVirt's) ``<backend type='passt'/>`` runs ferryd in passt's place.

What libvirt sends. libvirt 11.3's qemu_passt.c runs the ``passt`` its
daemon finds first on PATH with::

    passt [--vhost-user] --one-off --socket STATEDIR/NAME-ALIAS.socket
          --pid STATEDIR/NAME-ALIAS-passt.pid [--mtu N] [--interface DEV]
          [--log-file FILE] [--address ADDR [--netmask PREFIX]]...
          [--tcp-ports SPEC | --udp-ports SPEC]...

(``--vhost-user`` for ``<interface type='vhostuser'>``; ``--mtu`` from
``<mtu size=.../>``; ``--interface`` from ``<source dev=.../>``;
``--log-file`` from ``<backend logFile=.../>``; one ``--address`` per
``<ip>``, ``--netmask`` only after an IPv4 one with a prefix; one port
option per ``<portForward>``: ``[ADDR][%DEV]/`` when it has an address or
a device, then ``all`` when it lists no range, else its ranges joined by
commas, each ``[~]START[-END][:TO[-TO_END]]``.) It waits for that process
to exit (0: set up, QEMU may connect), then reads the pid file to put the
daemon into the VM's cgroup and, for a ``type='user'`` interface, to kill
it when the VM stops (SIGTERM); ``--one-off`` makes passt exit when QEMU
closes the connection, which is what ends a ``type='vhostuser'`` one's
(a real libvirt 11.3 was seen doing both). Older libvirt also sent
``--mac-addr`` with the *guest's* MAC, which passt reads as its own (see
below); libvirt after 11.3 (its development tree) adds ``--hostname`` and
``--fqdn``.

How it is read. As passt reads it (getopt_long with the option string
``+dqfel:hs:...``): short options may be bundled and take their value
attached or as the next word, long ones take ``--opt=value`` or the next
word and may be abbreviated to a unique prefix, the first word that is no
option ends the options (and is refused, as passt does). Where passt
takes the last of repeated options, so does this. :func:`translate_untrusted`
turns the words into ferryd's (pure: no file, no socket is touched; its
one error is :class:`PasstArgvError`, a one-line message naming the
option); :func:`main` prints that message and exits 2, or runs ferryd
with the result (exec: the same pid, which libvirt waits for).

Every passt option (passt 2026-07-28, passt(1) and conf.c), and what
happens to it:

==============================  ==============================================
passt                           ferryd
==============================  ==============================================
``-s``, ``--socket``,           ``--socket PATH``. Without it passt probes
``--socket-path PATH``          /tmp/passt_N.socket; ferry refuses (a path
                                is needed).
``--vhost-user``                ``--vhost-user``
``-1``, ``--one-off``           ``--one-off`` (exit 0 when QEMU's connection
                                ends; not after a migration as source, as
                                passt)
``-P``, ``--pid FILE``          ``--pid FILE`` (written once ready, before the
                                parent exits; removed at exit if possible)
(default: background)           ``--daemonize``: the parent exits 0 once
                                ferryd serves, with its status if it fails
``-f``, ``--foreground``        (no ``--daemonize``)
``-l``, ``--log-file PATH``     ``--log-file PATH`` (appended to; passt
                                truncates it)
``-d``, ``--debug``             ``-v``
``--trace``                     ``-vv``
``-q``, ``--quiet``             ``-q``
``-e``, ``--stderr``            accepted, no effect (deprecated no-op in passt)
``--runas USER[:GROUP]``        ``--runas`` (same meaning; nobody by default
                                when root)
``-m``, ``--mtu N``             ``-m N``; 0 (passt: no MTU advertised) refused
``-a``, ``--address ADDR[/P]``  ``-a ADDR/P``, the prefix as passt picks it:
                                the given one, else ``--netmask``, else the
                                IPv4 address's class (A /8, B /16, C /24,
                                else /32); IPv6 always /64 (passt ignores a
                                given one)
``-n``, ``--netmask MASK``      the IPv4 ``-a``'s prefix (bits or
                                dot-decimal); refused without an IPv4
                                ``--address`` or next to a ``/PREFIX``
``-g``, ``--gateway ADDR``      ``-g ADDR`` (IPv6: ferryd wants link-local)
``-M``, ``--mac-addr MAC``      ``-M MAC``: passt's *own* MAC toward the
                                guest, ferryd's ``-M`` too (older libvirt
                                passed the guest's MAC here; passt took it
                                as its own just the same)
``-i``, ``--interface NAME``    ``--interface NAME`` (addresses and gateway
                                from that host interface)
``-D``, ``--dns ADDR|none``     ``-D ADDR`` / ``-D none``
``--no-dhcp-dns``               ``-D none`` (ferryd's DNS list is only
                                advertised)
``-S``, ``--search none``,      accepted: ferryd sends no search list
``--no-dhcp-search``
``-4`` / ``-6``                 ``-4`` / ``-6`` (last one wins)
(default: gateway mapped to     ``--map-gw`` (ferryd's own default is off)
the host)
``--no-map-gw``,                no ``--map-gw``
``--map-host-loopback none``
``--map-guest-addr none``       accepted: ferryd maps no guest address
``-t``, ``-u SPEC``             ``-t SPEC`` / ``-u SPEC`` after ferry's parser
                                (daemon/flows/portspec.py) accepted it:
                                ``PORT``, ``A-B``, ``H:G``, ``A-B:C-D``,
                                lists, ``ADDR/``, ``~`` exclusions next to
                                ranges, ``none``
``--repair-path PATH|none``     ``--repair-listen PATH`` (passt LISTENS there
                                for passt-repair); by default, with
                                ``--vhost-user``, ``SOCKET.repair`` as passt;
                                ``none``: no listener; refused without
                                ``--vhost-user`` (as passt does)
``--chroot-fallback``           accepted, no effect: ferryd sandboxes with
                                seccomp and never pivot_root()s
``-h``, ``--help``,             print, exit 0 (``--print-capabilities``:
``--version``,                  ``{"type": "net"}``, vhost-user's
``--print-capabilities``        back-end convention, as passt)
==============================  ==============================================

Refused, exit status 2 and a line naming the option and why: ``-F``/
``--fd`` (ferryd listens, it takes no connected socket), ``-p``/``--pcap``,
``-o``/``--outbound``, ``--outbound-if4``/``--outbound-if6`` (ferryd does
not bind its outbound sockets), ``--dns-forward``, ``--dns-host`` (no DNS
address mapping), ``-S LIST``, ``-H``/``--hostname``, ``--fqdn`` (DHCP
options ferryd does not send), ``--no-tcp``, ``--no-udp``, ``--no-icmp``,
``--no-dhcp``, ``--no-dhcpv6``, ``--no-ndp``, ``--no-ra`` (ferryd cannot
switch a protocol off), ``--freebind``, ``--map-host-loopback ADDR``,
``--map-guest-addr ADDR``, ``--log-size``, ``--migrate-exit``,
``--migrate-no-linger``, ``--stats``, ``-c``/``--conf-path``, every
pasta-only option (``-I``, ``-T``, ``-U``, ``--userns``, ``--netns``,
``--netns-only``, ``--ns-mac-addr``, ``--config-net``, ``--no-copy-routes``,
``--no-copy-addrs``, ``--no-splice``, ``--splice-only``,
``--host-lo-to-ns-lo``, ``--no-netns-quit``, ``--dhcp-dns``,
``--dhcp-search``), port specs ferry cannot forward (``all``, an
exclusion-only list, ``ADDR%DEV/``, a target address ``:ADDR/PORT``), and
any word after the options.
"""

from __future__ import annotations

import getopt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ferryd.flows.portspec import parse_port_spec

__all__ = ["PasstArgvError", "Translation", "main", "translate_untrusted"]

PROG = "ferry-passt"

#: passt's getopt option string, as conf.c's (the leading "+": stop at the first non-option).
SHORT_OPTIONS = "dqfel:hs:c:F:I:p:P:m:a:n:M:g:i:o:D:S:H:461t:u:T:U:"

#: passt's long options ("=": takes a value), as conf.c's table.
LONG_OPTIONS = (
    "debug", "quiet", "foreground", "stderr", "log-file=", "help", "socket=", "fd=",
    "ns-ifname=", "pcap=", "pid=", "mtu=", "address=", "netmask=", "mac-addr=", "gateway=",
    "interface=", "outbound=", "dns=", "search=", "hostname=", "no-tcp", "no-udp", "no-icmp",
    "no-dhcp", "no-dhcpv6", "no-ndp", "no-ra", "no-splice", "splice-only", "freebind",
    "no-map-gw", "ipv4-only", "ipv6-only", "one-off", "tcp-ports=", "udp-ports=", "tcp-ns=",
    "udp-ns=", "userns=", "netns=", "ns-mac-addr=", "dhcp-dns", "no-dhcp-dns", "dhcp-search",
    "no-dhcp-search", "dns-forward=", "no-netns-quit", "trace", "runas=", "log-size=",
    "version", "outbound-if4=", "outbound-if6=", "config-net", "no-copy-routes",
    "no-copy-addrs", "netns-only", "map-host-loopback=", "map-guest-addr=",
    "host-lo-to-ns-lo", "dns-host=", "vhost-user", "print-capabilities", "socket-path=",
    "fqdn=", "repair-path=", "migrate-exit", "migrate-no-linger", "stats=", "conf-path=",
    "chroot-fallback",
)  # fmt: skip

#: Short options and their long names (one name per option below).
_SHORT_NAMES = {
    "-d": "--debug", "-q": "--quiet", "-f": "--foreground", "-e": "--stderr",
    "-l": "--log-file", "-h": "--help", "-s": "--socket", "-c": "--conf-path", "-F": "--fd",
    "-I": "--ns-ifname", "-p": "--pcap", "-P": "--pid", "-m": "--mtu", "-a": "--address",
    "-n": "--netmask", "-M": "--mac-addr", "-g": "--gateway", "-i": "--interface",
    "-o": "--outbound", "-D": "--dns", "-S": "--search", "-H": "--hostname",
    "-4": "--ipv4-only", "-6": "--ipv6-only", "-1": "--one-off", "-t": "--tcp-ports",
    "-u": "--udp-ports", "-T": "--tcp-ns", "-U": "--udp-ns", "--socket-path": "--socket",
}  # fmt: skip

#: Refused options and why (the message's second half).
_REFUSED = {
    "--fd": "ferryd listens on --socket; it takes no connected socket from its caller",
    "--pcap": "ferryd writes no packet capture",
    "--outbound": "ferryd does not bind its outbound sockets to an address",
    "--outbound-if4": "ferryd does not bind its outbound sockets to an interface",
    "--outbound-if6": "ferryd does not bind its outbound sockets to an interface",
    "--dns-forward": "ferryd maps no DNS address to the host's resolver",
    "--dns-host": "ferryd maps no DNS address to the host's resolver",
    "--hostname": "ferryd's DHCP server sends no host name",
    "--fqdn": "ferryd's DHCP servers send no FQDN",
    "--no-tcp": "ferryd cannot switch TCP off",
    "--no-udp": "ferryd cannot switch UDP off",
    "--no-icmp": "ferryd cannot switch ICMP off",
    "--no-dhcp": "ferryd cannot switch DHCP off",
    "--no-dhcpv6": "ferryd cannot switch DHCPv6 off",
    "--no-ndp": "ferryd cannot switch NDP off",
    "--no-ra": "ferryd cannot switch router advertisements off",
    "--freebind": "ferryd binds forwards only to addresses the host has",
    "--log-size": "ferryd does not limit its log file",
    "--migrate-exit": "deprecated in passt; ferryd's migration source lingers, then exits",
    "--migrate-no-linger": "deprecated in passt; ferryd's migration source always lingers",
    "--stats": "ferryd prints no statistics (ferryctl counters does)",
    "--conf-path": "ferryd has no pesto configuration socket (ferryctl has --control)",
}
_PASTA_ONLY = (
    "--ns-ifname", "--tcp-ns", "--udp-ns", "--userns", "--netns", "--netns-only",
    "--ns-mac-addr", "--config-net", "--no-copy-routes", "--no-copy-addrs", "--no-splice",
    "--splice-only", "--host-lo-to-ns-lo", "--no-netns-quit", "--dhcp-dns", "--dhcp-search",
)  # fmt: skip


class PasstArgvError(Exception):
    """passt's command line asks for something ferryd cannot do, or is malformed (the
    caller's to fix: exit 2)."""


@dataclass
class Translation:
    """What ``ferry-passt ARGV`` does: print ``output`` and exit 0, or run ferryd with
    ``ferryd_args``."""

    ferryd_args: list[str] = field(default_factory=list)
    output: str | None = None


@dataclass
class _Seen:
    """passt's options, as read (the last of a repeated one wins, as in passt)."""

    socket: str | None = None
    vhost_user: bool = False
    one_off: bool = False
    pid: str | None = None
    foreground: bool = False
    log_file: str | None = None
    verbosity: str | None = None  # "-v", "-vv", "-q"
    runas: str | None = None
    mtu: str | None = None
    addresses: dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]] = field(
        default_factory=dict
    )
    netmask: int | None = None
    gateways: list[str] = field(default_factory=list)
    mac: str | None = None
    interface: str | None = None
    dns: list[str] = field(default_factory=list)
    family: str | None = None  # "-4", "-6"
    map_gw: bool = True
    forwards: list[tuple[str, str]] = field(default_factory=list)
    repair_path: str | None = None


def translate_untrusted(argv: Sequence[str]) -> Translation:
    """passt's argv (without the program name) as ferryd's; raises PasstArgvError only."""
    try:
        pairs, rest = getopt.getopt(list(argv), SHORT_OPTIONS, LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise PasstArgvError(f"{exc.msg} (passt's options; see {PROG} --help)") from None
    if rest:
        raise PasstArgvError(f"extra non-option argument: {rest[0]!r}")
    seen = _Seen()
    for option, value in pairs:
        name = _SHORT_NAMES.get(option, option)
        output = _read(seen, name, value)
        if output is not None:
            return Translation(output=output)
    return Translation(ferryd_args=_ferryd_args(seen))


def _read(seen: _Seen, name: str, value: str) -> str | None:
    """Take one option into ``seen``; an option that prints and exits returns its output."""
    if name in _REFUSED:
        raise PasstArgvError(f"{name}: not supported: {_REFUSED[name]}")
    if name in _PASTA_ONLY:
        raise PasstArgvError(f"{name}: pasta only (ferry-passt replaces passt, not pasta)")
    match name:
        case "--help":
            return HELP
        case "--version":
            return f"{PROG}: ferry's ferryd behind passt's command line"
        case "--print-capabilities":
            return '{\n  "type": "net"\n}'
        case "--socket":
            seen.socket = value
        case "--vhost-user":
            seen.vhost_user = True
        case "--one-off":
            seen.one_off = True
        case "--pid":
            seen.pid = value
        case "--foreground":
            seen.foreground = True
        case "--log-file":
            seen.log_file = value
        case "--debug":
            seen.verbosity = "-v"
        case "--trace":
            seen.verbosity = "-vv"
        case "--quiet":
            seen.verbosity = "-q"
        case "--stderr" | "--chroot-fallback" | "--no-dhcp-search":
            pass  # no effect in passt, or nothing ferryd does (the table above)
        case "--runas":
            seen.runas = value
        case "--mtu":
            seen.mtu = _mtu(value)
        case "--address":
            _address(seen, value)
        case "--netmask":
            seen.netmask = _netmask(value)
        case "--gateway":
            seen.gateways.append(value)
        case "--mac-addr":
            seen.mac = value
        case "--interface":
            seen.interface = value
        case "--dns":
            seen.dns = ["none"] if value == "none" else [d for d in seen.dns if d != "none"]
            if value != "none":
                seen.dns.append(value)
        case "--no-dhcp-dns":
            seen.dns = ["none"]
        case "--search":
            if value != "none":
                raise PasstArgvError(
                    f"--search {value}: not supported: ferryd sends no DNS search list"
                )
        case "--ipv4-only":
            seen.family = "-4"
        case "--ipv6-only":
            seen.family = "-6"
        case "--no-map-gw":
            seen.map_gw = False
        case "--map-host-loopback" | "--map-guest-addr":
            if value != "none":
                raise PasstArgvError(
                    f"{name} {value}: not supported: ferryd maps no address but the gateway "
                    "to the host (the default; --no-map-gw turns it off)"
                )
            if name == "--map-host-loopback":
                seen.map_gw = False
        case "--tcp-ports" | "--udp-ports":
            _port_spec(name, value)
            seen.forwards.append(("-t" if name == "--tcp-ports" else "-u", value))
        case "--repair-path":
            seen.repair_path = value
        case _:  # every option of LONG_OPTIONS is handled above
            raise AssertionError(name)
    return None


def _address(seen: _Seen, value: str) -> None:
    text, slash, prefix_text = value.partition("/")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise PasstArgvError(f"--address {value}: not an IPv4 or IPv6 address") from None
    prefix: int | None = None
    if slash:
        limit = 32 if address.version == 4 else 128
        if not prefix_text.isdigit() or int(prefix_text) > limit:
            raise PasstArgvError(f"--address {value}: the prefix length must be 0-{limit}")
        prefix = int(prefix_text)
    if address.is_loopback or address.is_multicast or address.is_unspecified:
        raise PasstArgvError(f"--address {value}: not a unicast address (as passt says)")
    seen.addresses[address.version] = (address, prefix)


def _mtu(value: str) -> str:
    """passt reads the MTU with strtoul's base 0 (decimal, 0x hex, 0 octal); ferryd: decimal."""
    try:
        number = int(value, 8) if value.isdigit() and value.startswith("0") else int(value, 0)
    except ValueError:
        raise PasstArgvError(f"--mtu {value}: not a number") from None
    if number == 0:
        raise PasstArgvError(f"--mtu {value}: ferryd always advertises the link's MTU")
    return str(number)


def _netmask(value: str) -> int:
    """passt's conf_ip4_prefix(): a prefix length, or a dot-decimal netmask."""
    if value.isdigit():
        if int(value) > 32:
            raise PasstArgvError(f"--netmask {value}: a prefix length must be 0-32")
        return int(value)
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{value}").prefixlen
    except ValueError:
        raise PasstArgvError(
            f"--netmask {value}: not a prefix length nor a contiguous dot-decimal netmask"
        ) from None


def _port_spec(name: str, value: str) -> None:
    try:
        parse_port_spec(value)
    except ValueError as exc:
        raise PasstArgvError(f"{name} {value}: ferry cannot forward this: {exc}") from None


def _class_prefix(address: ipaddress.IPv4Address) -> int:
    """passt's ip4_class_prefix_len(): the prefix of the address's class (RFC 791 §3.2)."""
    first = address.packed[0]
    if first < 128:
        return 8
    if first < 192:
        return 16
    if first < 224:
        return 24
    return 32


def _ferryd_args(seen: _Seen) -> list[str]:
    if seen.socket is None:
        raise PasstArgvError(
            "--socket PATH is needed: ferryd does not probe /tmp/passt_N.socket as passt does"
        )
    args = ["--socket", seen.socket]
    if seen.vhost_user:
        args.append("--vhost-user")
    if seen.one_off:
        args.append("--one-off")
    if seen.pid is not None:
        args += ["--pid", seen.pid]
    if not seen.foreground:
        args.append("--daemonize")
    if seen.log_file is not None:
        args += ["--log-file", seen.log_file]
    if seen.verbosity is not None:
        args.append(seen.verbosity)
    if seen.runas is not None:
        args += ["--runas", seen.runas]
    if seen.mtu is not None:
        args += ["-m", seen.mtu]
    if seen.interface is not None:
        args += ["--interface", seen.interface]
    args += _addresses(seen)
    for gateway in seen.gateways:
        args += ["-g", gateway]
    if seen.mac is not None:
        args += ["-M", seen.mac]
    for server in seen.dns:
        args += ["-D", server]
    if seen.family is not None:
        args.append(seen.family)
    if seen.map_gw:
        args.append("--map-gw")
    for option, spec in seen.forwards:
        args += [option, spec]
    args += _repair(seen)
    return args


def _addresses(seen: _Seen) -> list[str]:
    args: list[str] = []
    v4 = seen.addresses.get(4)
    if seen.netmask is not None:
        if v4 is None:
            raise PasstArgvError(
                "--netmask: needs an IPv4 --address (ferryd does not combine a netmask "
                "with the host's address)"
            )
        if v4[1] is not None:
            raise PasstArgvError(
                f"--netmask: redundant prefix length specification (--address {v4[0]}/{v4[1]})"
            )
    if v4 is not None:
        address, prefix = v4
        assert isinstance(address, ipaddress.IPv4Address)
        if prefix is None:
            prefix = seen.netmask if seen.netmask is not None else _class_prefix(address)
        args += ["-a", f"{address}/{prefix}"]
    v6 = seen.addresses.get(6)
    if v6 is not None:
        args += ["-a", f"{v6[0]}/64"]  # passt's IPv6 prefix is always /64
    return args


def _repair(seen: _Seen) -> list[str]:
    path = seen.repair_path
    if not seen.vhost_user:
        if path not in (None, "none"):
            raise PasstArgvError(f"--repair-path {path}: for --vhost-user mode only (as passt)")
        return []
    if path == "none":
        return []
    assert seen.socket is not None
    return ["--repair-listen", path if path is not None else f"{seen.socket}.repair"]


HELP = f"""\
Usage: {PROG} [passt's options]

ferry's ferryd behind passt's command line, for libvirt's and KubeVirt's
<backend type='passt'/>: install it as a `passt` found first on libvirt's PATH.
Accepted and mapped: --socket/-s, --vhost-user, --one-off/-1, --pid/-P,
--foreground/-f, --log-file/-l, --debug/-d, --trace, --quiet/-q, --runas,
--mtu/-m, --address/-a, --netmask/-n, --gateway/-g, --mac-addr/-M (ferryd's
own MAC), --interface/-i, --dns/-D, --no-dhcp-dns, --ipv4-only/-4,
--ipv6-only/-6, --no-map-gw, --map-host-loopback none, --map-guest-addr none,
--tcp-ports/-t, --udp-ports/-u (ferry's subset of passt's specs),
--repair-path, and as no-ops --stderr/-e, --chroot-fallback, --search none,
--no-dhcp-search. Every other passt option is refused with exit status 2.
The daemon goes to the background once it serves (as passt), unless -f."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ferry-passt`` (and of a ``passt`` symlink to it)."""
    try:
        translation = translate_untrusted(sys.argv[1:] if argv is None else argv)
    except PasstArgvError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if translation.output is not None:
        print(translation.output)
        sys.exit(0)
    # exec, not a call: the pid libvirt started stays ferryd's (ferryd.main is
    # composed last and imported by nothing).
    command = [sys.executable, "-m", "ferryd.main", *translation.ferryd_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
