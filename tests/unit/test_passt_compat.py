"""ferry-passt: the argv libvirt 11.3 builds for passt, as ferryd's; everything else refused.

The libvirt command lines are written down from qemu_passt.c's logic
(ferryd.passt_compat's docstring) for a few domain XMLs, two of them as
captured from a real libvirt 11.3 (a ``passt`` first on libvirtd's PATH
that recorded its argv): the state directory /run/libvirt/qemu/passt,
the domain's short name ``ID-NAME``, the interface's alias. Each
translation must also be one ferryd itself accepts (its own parser, the
same one ``ferryd`` runs).
"""

from __future__ import annotations

import pytest

from ferryd.config import parse_options
from ferryd.passt_compat import (
    LONG_OPTIONS,
    PasstArgvError,
    main,
    translate_untrusted,
)

STATE = "/run/libvirt/qemu/passt"
SOCKET = f"{STATE}/1-vm1-net0.socket"
PID = f"{STATE}/1-vm1-net0-passt.pid"


def libvirt(*extra: str, vhost_user: bool = False) -> list[str]:
    """What qemuPasstBuildCommand() starts with, then ``extra``."""
    head = ["--vhost-user"] if vhost_user else []
    return [*head, "--one-off", "--socket", SOCKET, "--pid", PID, *extra]


def ferryd_args(argv: list[str]) -> list[str]:
    translation = translate_untrusted(argv)
    assert translation.output is None
    parse_options(translation.ferryd_args)  # ferryd's own parser takes it
    return translation.ferryd_args


def test_a_bare_passt_backend() -> None:
    """<interface type='user'><backend type='passt'/><model type='virtio'/></interface>"""
    assert ferryd_args(libvirt()) == [
        "--socket", SOCKET, "--one-off", "--pid", PID, "--daemonize", "--map-gw",
    ]  # fmt: skip


def test_vhost_user_with_mtu_source_log_addresses_and_forwards() -> None:
    """Captured from libvirt 11.3 (a ``passt`` on its PATH recording its argv) for::

    <interface type='vhostuser'>
      <backend type='passt' logFile='/var/log/p.log'/>
      <source dev='up0'/> <mtu size='1500'/>
      <ip address='10.77.0.1' prefix='24'/> <ip family='ipv6' address='fd00:77::1'/>
      <portForward proto='tcp'><range start='2022' to='22'/></portForward>
      <portForward proto='udp' address='10.77.0.1'>
        <range start='5000' end='5010' to='6000'/><range start='5005' exclude='yes'/>
      </portForward>
      <model type='virtio'/>
    </interface>
    """
    argv = [
        "--vhost-user", "--one-off", "--socket", SOCKET, "--pid", PID, "--mtu", "1500",
        "--interface", "up0", "--log-file", "/var/log/p.log", "--address", "10.77.0.1",
        "--netmask", "24", "--address", "fd00:77::1", "--tcp-ports", "2022:22",
        "--udp-ports", "10.77.0.1/5000-5010:6000-6010,~5005",
    ]  # fmt: skip
    assert ferryd_args(argv) == [
        "--socket", SOCKET, "--vhost-user", "--one-off", "--pid", PID, "--daemonize",
        "--log-file", "/var/log/p.log", "-m", "1500", "--interface", "up0",
        "-a", "10.77.0.1/24", "-a", "fd00:77::1/64", "--map-gw", "-t", "2022:22",
        "-u", "10.77.0.1/5000-5010:6000-6010,~5005", "--repair-listen", f"{SOCKET}.repair",
    ]  # fmt: skip
    (udp,) = parse_options(ferryd_args(argv)).udp_forwards
    assert [(str(f.bind), f.host_port, f.guest_port) for f in udp] == [
        ("10.77.0.1", port, port + 1000) for port in range(5000, 5011) if port != 5005
    ]


def test_user_with_an_address_without_prefix() -> None:
    """Captured from libvirt 11.3 for ``<interface type='user'><backend type='passt'/>
    <ip address='10.77.0.1'/><model type='virtio'/></interface>`` (domain 2, vmu):
    no prefix, so passt's class A /8."""
    argv = [
        "--one-off", "--socket", f"{STATE}/2-vmu-net0.socket",
        "--pid", f"{STATE}/2-vmu-net0-passt.pid", "--address", "10.77.0.1",
    ]  # fmt: skip
    assert ferryd_args(argv) == [
        "--socket", f"{STATE}/2-vmu-net0.socket", "--one-off",
        "--pid", f"{STATE}/2-vmu-net0-passt.pid", "--daemonize", "-a", "10.77.0.1/8", "--map-gw",
    ]  # fmt: skip


def test_source_dev_and_a_classful_address() -> None:
    """<source dev='eth1'/> and <ip address='192.168.5.7'/> (no prefix: passt takes the
    address's class, C: /24), <portForward proto='tcp'><range start='8080'/></portForward>."""
    argv = libvirt("--interface", "eth1", "--address", "192.168.5.7", "--tcp-ports", "8080")
    assert ferryd_args(argv) == [
        "--socket", SOCKET, "--one-off", "--pid", PID, "--daemonize",
        "--interface", "eth1", "-a", "192.168.5.7/24", "--map-gw", "-t", "8080",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("address", "prefix"),
    [("10.1.2.3", 8), ("172.16.0.9", 16), ("192.0.2.1", 24), ("240.0.0.1", 32)],
)
def test_an_ipv4_address_without_prefix_takes_its_class(address: str, prefix: int) -> None:
    assert f"{address}/{prefix}" in ferryd_args(libvirt("--address", address))


@pytest.mark.parametrize(
    ("portforward", "spec", "why"),
    [
        # <portForward proto='tcp'/> with no range: libvirt writes "all".
        ("no range", "all", "'all' is not supported"),
        # <portForward proto='tcp' address='192.0.2.1' dev='eth1'><range start='80'/>
        ("address and dev", "192.0.2.1%eth1/80", "binding to an interface"),
        # <portForward proto='tcp' dev='eth1'><range start='80'/>
        ("dev only", "%eth1/80", "binding to an interface"),
        # <portForward proto='tcp'><range start='22' exclude='yes'/>: all but 22.
        ("an exclusion only", "~22", "only excludes ports"),
    ],
)
def test_libvirt_forwards_ferry_cannot_do_are_refused(
    portforward: str, spec: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(libvirt("--tcp-ports", spec))
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1, portforward
    assert message.startswith(f"ferry-passt: error: --tcp-ports {spec}: ") and why in message


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--pcap", "/tmp/x.pcap"], "--pcap"),
        (["-p", "/tmp/x.pcap"], "--pcap"),
        (["--fd", "3"], "--fd"),
        (["-F3"], "--fd"),
        (["--outbound", "192.0.2.9"], "--outbound"),
        (["--outbound-if4", "eth0"], "--outbound-if4"),
        (["--dns-forward", "10.0.2.3"], "--dns-forward"),
        (["--hostname", "vm1"], "--hostname"),
        (["--fqdn", "vm1.example"], "--fqdn"),
        (["--no-dhcp"], "--no-dhcp"),
        (["--no-udp"], "--no-udp"),
        (["--freebind"], "--freebind"),
        (["--map-host-loopback", "10.0.2.2"], "--map-host-loopback"),
        (["--map-guest-addr", "10.0.2.3"], "--map-guest-addr"),
        (["--search", "example.org"], "--search"),
        (["--log-size", "4096"], "--log-size"),
        (["--migrate-exit"], "--migrate-exit"),
        (["--netns", "/run/netns/x"], "--netns"),
        (["-T", "80"], "--tcp-ns"),
        (["--mtu", "0"], "--mtu 0"),
        (["--mtu", "0x0"], "--mtu 0x0"),
        (["--mtu", "15OO"], "--mtu 15OO: not a number"),
        (["--address", "127.0.0.1"], "--address 127.0.0.1: not a unicast address"),
        (["--address", "ff02::1"], "--address ff02::1: not a unicast address"),
        (["--netmask", "24"], "--netmask"),  # no IPv4 --address
        (["--address", "10.0.2.15/24", "--netmask", "24"], "--netmask"),
        (["--netmask", "255.0.255.0", "--address", "10.0.2.15"], "--netmask 255.0.255.0"),
        (["--address", "10.0.2.999"], "--address"),
        (["--address", "10.0.2.15/33"], "--address"),
        (["--repair-path", "/run/r.sock"], "--repair-path"),  # not --vhost-user
        (["--bogus"], "option --bogus not recognized"),
        (["--sock", "/x"], "option --sock not a unique prefix"),
        (["extra"], "extra non-option argument: 'extra'"),
    ],
)
def test_refused_with_one_line_naming_the_option_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(libvirt(*argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ferry-passt: error: ") and named in err


def test_a_socket_path_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--one-off"])
    assert exit_.value.code == 2
    assert "--socket PATH is needed" in capsys.readouterr().err


def test_getopt_forms_as_passt_reads_them() -> None:
    """Bundled short options, values attached or after '=', unique long prefixes."""
    assert ferryd_args(["-f1", "-s/run/x.sock", "--vhost", "--pid=/run/x.pid", "-t80"]) == [
        "--socket", "/run/x.sock", "--vhost-user", "--one-off", "--pid", "/run/x.pid",
        "--map-gw", "-t", "80", "--repair-listen", "/run/x.sock.repair",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-f"], []),  # no --daemonize
        (["-M", "52:54:00:12:34:56"], ["-M", "52:54:00:12:34:56"]),  # passt's own MAC
        (["-g", "10.0.2.2", "-g", "fe80::1"], ["-g", "10.0.2.2", "-g", "fe80::1"]),
        (["-D", "10.0.2.3", "-D", "2001:db8::53"], ["-D", "10.0.2.3", "-D", "2001:db8::53"]),
        (["-D", "10.0.2.3", "-D", "none"], ["-D", "none"]),
        (["--no-dhcp-dns"], ["-D", "none"]),
        (["-4"], ["-4"]),
        (["-4", "-6"], ["-6"]),  # the last one wins, as in passt
        (["-d"], ["-v"]),
        (["--trace"], ["-vv"]),
        (["-d", "-q"], ["-q"]),
        (["--runas", "65534:65534"], ["--runas", "65534:65534"]),
        (["-m", "0x5dc"], ["-m", "1500"]),  # passt reads it with strtoul's base 0
        (["-m", "02734"], ["-m", "1500"]),
        (["--address", "10.0.2.15", "--netmask", "255.255.255.192"], ["-a", "10.0.2.15/26"]),
        (["-e", "--chroot-fallback", "--search", "none", "--no-dhcp-search"], []),
    ],
)
def test_mapped_options(argv: list[str], expected: list[str]) -> None:
    got = ferryd_args(["--socket", "/run/x.sock", "-f", *argv])
    assert got == ["--socket", "/run/x.sock", *expected, "--map-gw"]


@pytest.mark.parametrize(
    ("argv", "map_gw"),
    [([], True), (["--no-map-gw"], False), (["--map-host-loopback", "none"], False)],
)
def test_the_gateway_maps_to_the_host_unless_passt_would_not(argv: list[str], map_gw: bool) -> None:
    """passt's default (ferryd's is the opposite) is kept."""
    assert parse_options(ferryd_args(libvirt(*argv))).map_gw is map_gw


@pytest.mark.parametrize(
    ("argv", "listen"),
    [
        ([], f"{SOCKET}.repair"),  # passt's default with --vhost-user
        (["--repair-path", "/run/r.sock"], "/run/r.sock"),
        (["--repair-path", "none"], None),
    ],
)
def test_repair_path_is_where_ferryd_listens_for_the_helper(
    argv: list[str], listen: str | None
) -> None:
    assert parse_options(ferryd_args(libvirt(*argv, vhost_user=True))).repair_listen == listen


def test_no_repair_listener_without_vhost_user() -> None:
    assert parse_options(ferryd_args(libvirt("--repair-path", "none"))).repair_listen is None


@pytest.mark.parametrize(
    ("option", "printed"),
    [("--help", "Usage: ferry-passt"), ("--version", "ferry"), ("--print-capabilities", '"net"')],
)
def test_printing_options_exit_0(
    option: str, printed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([option])
    assert exit_.value.code == 0 and printed in capsys.readouterr().out


@pytest.mark.parametrize("option", LONG_OPTIONS)
def test_every_passt_option_is_decided(option: str) -> None:
    """Each of passt's options is mapped, accepted or refused: none falls through."""
    name = option.removesuffix("=")
    words = [f"--{name}", "none"] if option.endswith("=") else [f"--{name}"]
    try:
        translate_untrusted(["--vhost-user", "--socket", "/run/x.sock", *words])
    except PasstArgvError as exc:
        assert str(exc)
