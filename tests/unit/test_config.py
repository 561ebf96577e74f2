"""Guest addressing from host defaults and overrides (ferryd.config), host facts passed in."""

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from ferryd.config import (
    AF_INET,
    AF_INET6,
    ConfigError,
    HostRoute,
    link_local_from_mac,
    make_link_config,
    parse_options,
)
from ferryd.migration.session import PRECOPY_QUIET

HOST = {
    AF_INET: HostRoute(ip_address("192.0.2.10"), 24, ip_address("192.0.2.1")),
    AF_INET6: HostRoute(ip_address("2001:db8::10"), 64, ip_address("fe80::1")),
}
DNS = [ip_address("127.0.0.53"), ip_address("192.0.2.53"), ip_address("2001:db8::53")]


def config(*args: str, routes: dict[int, HostRoute] | None = None):  # type: ignore[no-untyped-def]
    opts = parse_options(["--netns", "guest", *args])
    return make_link_config(opts, HOST if routes is None else routes, DNS)


def test_defaults_are_the_hosts() -> None:
    link = config()
    assert link.mtu == 65520
    assert link.ipv4 is not None and link.ipv6 is not None
    assert (link.ipv4.address, link.ipv4.prefixlen, link.ipv4.gateway) == (
        IPv4Address("192.0.2.10"),
        24,
        IPv4Address("192.0.2.1"),
    )
    assert link.ipv4.dns == (IPv4Address("192.0.2.53"),)  # loopback resolvers left out
    assert link.ipv6.address == IPv6Address("2001:db8::10")
    assert link.ipv6.gateway == IPv6Address("fe80::1")  # the host's, being link-local
    assert link.ipv6.dns == (IPv6Address("2001:db8::53"),)


def test_overrides() -> None:
    link = config(
        "-a", "10.1.2.3/16", "-g", "10.1.0.1", "-m", "9000", "-M", "02:00:00:00:00:07",
        "-D", "10.1.0.53", "-a", "fd00::5/64", "-g", "fe80::7",
    )  # fmt: skip
    assert link.mac == bytes.fromhex("020000000007")
    assert link.mtu == 9000
    assert link.ipv4 is not None and link.ipv6 is not None
    assert (str(link.ipv4.address), link.ipv4.prefixlen, str(link.ipv4.gateway)) == (
        "10.1.2.3",
        16,
        "10.1.0.1",
    )
    assert link.ipv4.dns == (IPv4Address("10.1.0.53"),) and link.ipv6.dns == ()
    assert (str(link.ipv6.address), str(link.ipv6.gateway)) == ("fd00::5", "fe80::7")


def test_ipv6_router_derived_from_mac_when_host_gateway_is_global() -> None:
    routes = dict(HOST)
    routes[AF_INET6] = HostRoute(ip_address("2001:db8::10"), 64, ip_address("2001:db8::1"))
    link = config(routes=routes)
    assert link.ipv6 is not None
    assert link.ipv6.gateway == link_local_from_mac(bytes.fromhex("9a559a559a55"))
    assert str(link.ipv6.gateway) == "fe80::9855:9aff:fe55:9a55"


def test_family_selection_and_mtu() -> None:
    assert config("-4").ipv6 is None
    assert config("-6").ipv4 is None
    assert config("-D", "none").ipv4.dns == ()
    assert config("-m", "1200").ipv6 is None  # below IPv6's minimum MTU: IPv6 off
    assert config(routes={AF_INET: HOST[AF_INET]}).ipv6 is None


@pytest.mark.parametrize(
    ("args", "routes", "message"),
    [
        ((), {}, "no guest address"),
        (("-6", "-m", "1200"), None, "at least 1280"),
        (("-g", "2001:db8::1"), None, "not link-local"),
        (("-M", "03:00:00:00:00:01"), None, "multicast"),
        (("-M", "nonsense"), None, "not a MAC"),
        (("-a", "300.1.1.1"), None, "not an address"),
        (("-a", "192.0.2.1/24"), None, "the guest's own address"),
    ],
)
def test_impossible_configurations_are_refused(
    args: tuple[str, ...], routes: dict[int, HostRoute] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config(*args, routes=routes)


def test_bad_option_values_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["-m", "70000"], ["-u", "99999"], ["-t", "1-2:3"]):
        with pytest.raises(SystemExit) as exc:
            parse_options(["--netns", "guest", *bad])
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err


def test_precopy_quiet_is_a_hidden_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Tests set it (0: pre-copy whatever is idle now); --help does not offer it."""
    assert parse_options(["--netns", "guest"]).precopy_quiet == PRECOPY_QUIET
    assert parse_options(["--netns", "guest", "--precopy-quiet", "0"]).precopy_quiet == 0.0
    with pytest.raises(SystemExit):
        parse_options(["--help"])
    assert "precopy-quiet" not in capsys.readouterr().out


def test_the_two_modes() -> None:
    tap = parse_options(["--netns", "guest"])
    assert (tap.netns, tap.tap, tap.socket) == ("guest", "tap0", None)
    stream = parse_options(["--socket", "/run/ferry/vm.sock", "-m", "1500"])
    assert (stream.netns, stream.socket, stream.mtu) == (None, "/run/ferry/vm.sock", 1500)
    assert make_link_config(stream, HOST, DNS).mtu == 1500  # addressing as in tap mode
    assert not stream.vhost_user
    vhost = parse_options(["--vhost-user", "--socket", "/run/ferry/vm.sock", "-t", "8080"])
    assert (vhost.vhost_user, vhost.socket, vhost.netns) == (True, "/run/ferry/vm.sock", None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of the arguments --netns --socket is required"),
        (["--netns", "g", "--socket", "s"], "--socket: not allowed with argument --netns"),
        (["--socket", "s", "--tap", "tap1"], "--tap: tap mode only"),
        (["--socket", "s", "--tap-fd", "3"], "--tap-fd: tap mode only"),
        (["--socket", "s", "--config-net"], "--config-net: tap mode only"),
        (["--netns", "g", "--vhost-user"], "--vhost-user: needs --socket PATH"),
        (["--socket", "s", "--vhost-user", "--incoming"], "--incoming: not with --vhost-user"),
        (["--netns", "g", "--one-off"], "--one-off: needs --socket PATH"),
    ],
)
def test_the_modes_do_not_mix(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
