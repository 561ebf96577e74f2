"""passt's -t/-u port specification syntax."""

import argparse
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.flows.portspec import PortForward, parse_port_spec


def pairs(spec: str) -> list[tuple[int, int]]:
    return [(f.host_port, f.guest_port) for f in parse_port_spec(spec)]


def test_single_port() -> None:
    assert parse_port_spec("22") == [PortForward(None, 22, 22)]


def test_mapped_port() -> None:
    assert parse_port_spec("8080:80") == [PortForward(None, 8080, 80)]


def test_range() -> None:
    assert pairs("80-82") == [(80, 80), (81, 81), (82, 82)]


def test_mapped_range() -> None:
    assert pairs("8000-8002:9000-9002") == [(8000, 9000), (8001, 9001), (8002, 9002)]


def test_list() -> None:
    assert pairs("22,80-82") == [(22, 22), (80, 80), (81, 81), (82, 82)]


def test_ipv4_bind() -> None:
    assert parse_port_spec("127.0.0.1/8080") == [PortForward(IPv4Address("127.0.0.1"), 8080, 8080)]


def test_ipv6_bind_with_mapping() -> None:
    assert parse_port_spec("::1/22:2222") == [PortForward(IPv6Address("::1"), 22, 2222)]


def test_bracketed_ipv6_bind() -> None:
    assert parse_port_spec("[::1]/22") == [PortForward(IPv6Address("::1"), 22, 22)]


def test_bind_applies_to_every_item() -> None:
    fwds = parse_port_spec("192.0.2.1/22,25")
    assert [f.bind for f in fwds] == [IPv4Address("192.0.2.1")] * 2


def test_none() -> None:
    assert parse_port_spec("none") == []


def test_exclusions() -> None:
    assert pairs("20-25,~22-23") == [(20, 20), (21, 21), (24, 24), (25, 25)]
    assert pairs("~21,20-22") == [(20, 20), (22, 22)]
    assert pairs("20-22:30-32,~21") == [(20, 30), (22, 32)]


def test_edges() -> None:
    assert pairs("1") == [(1, 1)]
    assert pairs("65535:1") == [(65535, 1)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("0", "not in 1-65535"),
        ("65536", "not in 1-65535"),
        ("http", "not a port number"),
        ("-5", "not a port number"),
        ("+5", "not a port number"),
        ("٣", "not a port number"),
        ("10-5", "runs backwards"),
        ("1-3:4-5", "maps 3 host ports to 2 guest ports"),
        ("1-3:4", "maps 3 host ports to 1 guest ports"),
        ("22,22", "given twice"),
        ("20-25,22:30", "given twice"),
        ("22,,23", "empty item"),
        ("22,", "empty item"),
        ("~22", "only excludes"),
        ("all", "not supported"),
        ("auto", "not supported"),
        ("localhost/22", "not an IPv4 or IPv6 address"),
        ("10.0.0.1%eth0/22", "interface"),
        ("/22", "empty address"),
        ("127.0.0.1/", "no ports"),
        ("22:", "not a port number"),
        ("22:23:24", "not a port number"),
    ],
)
def test_errors(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_port_spec(spec)


def test_argparse_type() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("-u", type=parse_port_spec, action="append", default=[])
    args = parser.parse_args(["-u", "53", "-u", "::1/5353:53"])
    assert args.u == [[PortForward(None, 53, 53)], [PortForward(IPv6Address("::1"), 5353, 53)]]
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["-u", "nope"])


# ---------------------------------------------------------------------------
# properties

ports = st.integers(1, 65535)


@st.composite
def items(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    """A (spec item, forwards it means) pair; ranges kept short."""
    start = draw(st.integers(1, 65535))
    length = draw(st.integers(1, min(20, 65536 - start)))
    hosts = range(start, start + length)
    text = str(start) if length == 1 else f"{start}-{start + length - 1}"
    if draw(st.booleans()):
        gstart = draw(st.integers(1, 65536 - length))
        guests = range(gstart, gstart + length)
        gtext = str(gstart) if length == 1 else f"{gstart}-{gstart + length - 1}"
        return f"{text}:{gtext}", list(zip(hosts, guests, strict=True))
    return text, [(h, h) for h in hosts]


@given(
    st.lists(items(), min_size=1, max_size=5),
    st.sampled_from([None, "127.0.0.1", "::1", "2001:db8::7"]),
)
def test_valid_specs_parse_to_what_they_mean(
    parts: list[tuple[str, list[tuple[int, int]]]], bind: str | None
) -> None:
    expected: list[tuple[int, int]] = []
    for _text, fwds in parts:
        expected += fwds
    hosts = [h for h, _ in expected]
    spec = ",".join(text for text, _ in parts)
    if bind is not None:
        spec = f"{bind}/{spec}"
    if len(set(hosts)) != len(hosts):
        with pytest.raises(ValueError, match="given twice"):
            parse_port_spec(spec)
        return
    result = parse_port_spec(spec)
    assert [(f.host_port, f.guest_port) for f in result] == expected
    assert all(str(f.bind) == bind if bind else f.bind is None for f in result)


@given(st.lists(items(), min_size=1, max_size=3), st.lists(ports, min_size=1, max_size=5))
def test_exclusions_remove_exactly_those_host_ports(
    parts: list[tuple[str, list[tuple[int, int]]]], excluded: list[int]
) -> None:
    expected = [fwd for _text, fwds in parts for fwd in fwds]
    hosts = [h for h, _ in expected]
    if len(set(hosts)) != len(hosts):
        return
    spec = ",".join([text for text, _ in parts] + [f"~{p}" for p in excluded])
    result = [(f.host_port, f.guest_port) for f in parse_port_spec(spec)]
    assert result == [fwd for fwd in expected if fwd[0] not in excluded]


@given(st.text(max_size=30))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        result = parse_port_spec(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert all(1 <= f.host_port <= 65535 and 1 <= f.guest_port <= 65535 for f in result)


@given(st.text(alphabet="0123456789-,:~/.", max_size=30))
def test_syntax_like_text_parses_or_raises_value_error(text: str) -> None:
    try:
        parse_port_spec(text)
    except ValueError as exc:
        assert str(exc)
