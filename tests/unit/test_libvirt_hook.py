"""The libvirt hook's parsing and dispatch, on libvirt's real arguments and domain XML.

The fixtures (fixtures/libvirt_hook/) are what libvirt 11.3 gave the hook
for domain vm1 of tests/integration/vm/test_vm_libvirt.py, one file per
call, in the order of a start and a ``virsh destroy``:
``vm1 prepare begin -``, ``start begin -``, ``started begin -``, ``stopped
end -``, ``release end destroyed``; the test's directories were replaced
by the production ones (/run/ferry for ferry's runtime directory). The
operations a plain start does not make (migrate, restore, reconnect,
attach) get the XML libvirt gives for the same state: the inactive one for
an incoming domain (migrate, restore), the live one for a running one.

No libvirt and no ferryd here: a call that would start or stop ferryd is
checked through its decision (action_for, opted_in); the processes are
tests/integration/test_libvirt_hook.py's.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd import libvirt_hook
from ferryd.libvirt_hook import (
    Action,
    DomainPaths,
    DomainXmlError,
    HookCall,
    Misconfigured,
    VhostUserSource,
    action_for,
    domain_xml_untrusted,
    ferryd_argv,
    is_ferryd_of,
    opted_in,
    parse_arguments,
    qemu_identity,
    read_ferryd_args,
)

FIXTURES = Path(__file__).parent / "fixtures" / "libvirt_hook"
#: libvirt's calls for one domain's start and destroy, with the XML each got.
CAPTURED = [
    ("vm1 prepare begin -", "vm1_prepare_begin.xml", Action.START),
    ("vm1 start begin -", "vm1_start_begin.xml", Action.ADMIT_QEMU),
    ("vm1 started begin -", "vm1_started_begin.xml", Action.NOTHING),
    ("vm1 stopped end -", "vm1_stopped_end.xml", Action.NOTHING),
    ("vm1 release end destroyed", "vm1_release_end.xml", Action.STOP),
]
#: The other calls libvirt's docs/hooks.rst lists, and what they mean for ferryd.
OTHERS = [
    ("vm1 migrate begin -", "vm1_prepare_begin.xml", Action.NOTHING),
    ("vm1 restore begin -", "vm1_prepare_begin.xml", Action.NOTHING),
    ("vm1 reconnect begin -", "vm1_started_begin.xml", Action.NOTHING),
    ("vm1 attach begin -", "vm1_started_begin.xml", Action.NOTHING),
    # Since libvirt 10.5 release says why the domain stopped; before, '-'.
    ("vm1 release end -", "vm1_release_end.xml", Action.STOP),
    ("vm1 release end shutdown", "vm1_release_end.xml", Action.STOP),
    ("vm1 release end failed", "vm1_release_end.xml", Action.STOP),
    # The source of a migration: ferryd lingers for its handed-over
    # connections and exits by itself.
    ("vm1 release end migrated", "vm1_release_end.xml", Action.NOTHING),
    # An operation a later libvirt may add is none of ferry's business.
    ("vm1 suspended begin -", "vm1_started_begin.xml", Action.NOTHING),
]
RUN = DomainPaths("vm1", Path("/run/ferry"), Path("/etc/ferry"))
SOCKET = "/run/ferry/vm1/vhost-user.sock"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def with_interface(xml: bytes, interface: str) -> bytes:
    """The fixture with its vhostuser interface replaced by *interface*."""
    replaced, n = re.subn(
        rb"<interface type='vhostuser'>.*?</interface>", interface.encode(), xml, flags=re.S
    )
    assert n == 1
    return replaced


@pytest.mark.parametrize(("args", "xml", "action"), CAPTURED + OTHERS)
def test_each_libvirt_call_and_what_it_does_to_an_opted_in_domain(
    args: str, xml: str, action: Action
) -> None:
    call = parse_arguments(args.split())
    assert call.domain == "vm1"
    assert action_for(call) is action
    sources = domain_xml_untrusted(fixture(xml)).sources
    assert sources == (VhostUserSource("unix", SOCKET, "client"),)
    assert opted_in(sources, RUN)


def test_the_fixtures_are_libvirts_and_name_the_production_socket() -> None:
    for _, name, _ in CAPTURED:
        text = fixture(name).decode()
        assert f"path='{SOCKET}' mode='client'" in text
        assert "/tmp/" not in text  # the test's directories were all replaced


@pytest.mark.parametrize(
    "interface",
    [
        # libvirt's other network back-ends
        "<interface type='network'><source network='default'/></interface>",
        "<interface type='user'><backend type='passt'/></interface>",
        "<interface type='bridge'><source bridge='br0'/></interface>",
        # vhost-user served by someone else
        "<interface type='vhostuser'><source type='unix' path='/run/dpdk/vm1.sock'"
        " mode='client'/></interface>",
        "<interface type='vhostuser'><source type='unix' path='/run/ferry-other/vm1/"
        "vhost-user.sock' mode='client'/></interface>",
        "<interface type='vhostuser'><backend type='passt'/></interface>",
        # the runtime directory itself is no socket of a domain
        "<interface type='vhostuser'><source type='unix' path='/run/ferry' mode='client'/>"
        "</interface>",
    ],
)
def test_a_domain_that_does_not_name_ferrys_directory_is_not_ferrys(interface: str) -> None:
    xml = with_interface(fixture("vm1_prepare_begin.xml"), interface)
    assert not opted_in(domain_xml_untrusted(xml).sources, RUN)


def test_a_domain_without_interfaces_is_not_ferrys() -> None:
    xml = with_interface(fixture("vm1_prepare_begin.xml"), "")
    assert domain_xml_untrusted(xml).sources == ()
    assert not opted_in((), RUN)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        (f"type='unix' path='{SOCKET}' mode='server'", "mode='client'"),
        (f"type='unix' path='{SOCKET}'", "mode='client'"),
        ("type='unix' path='/run/ferry/vm2/vhost-user.sock' mode='client'", "must be type='unix'"),
        ("type='unix' path='/run/ferry/vm1/other.sock' mode='client'", "must be type='unix'"),
        (f"type='tcp' path='{SOCKET}' mode='client'", "must be type='unix'"),
    ],
)
def test_a_domain_naming_ferrys_directory_wrongly_is_refused_with_the_reason(
    source: str, why: str
) -> None:
    interface = f"<interface type='vhostuser'><source {source}/></interface>"
    xml = with_interface(fixture("vm1_prepare_begin.xml"), interface)
    with pytest.raises(Misconfigured, match=re.escape(why)):
        opted_in(domain_xml_untrusted(xml).sources, RUN)


def test_two_interfaces_on_ferrys_directory_are_refused() -> None:
    one = f"<interface type='vhostuser'><source type='unix' path='{SOCKET}' mode='client'/>"
    xml = with_interface(fixture("vm1_prepare_begin.xml"), f"{one}</interface>{one}</interface>")
    with pytest.raises(Misconfigured, match="one ferryd serves one interface"):
        opted_in(domain_xml_untrusted(xml).sources, RUN)


@pytest.mark.parametrize("name", ["-vm", ".vm", "vm 1", "vm\n1", "vm$1", "é", "v" * 200])
def test_a_domain_name_that_cannot_name_a_unit_is_refused(name: str) -> None:
    paths = DomainPaths(name, RUN.runtime, RUN.config)
    source = VhostUserSource("unix", str(paths.socket), "client")
    with pytest.raises(Misconfigured, match=r"domain name|longer than"):
        opted_in([source], paths)


def test_a_path_that_only_looks_under_the_directory_counts_by_its_normal_form() -> None:
    source = VhostUserSource("unix", "/run/ferry/../ferry/vm1/./vhost-user.sock", "client")
    assert opted_in([source], RUN)
    elsewhere = VhostUserSource("unix", "/run/ferry/../dpdk/vm1.sock", "client")
    assert not opted_in([elsewhere], RUN)


def test_only_vhostuser_interfaces_sources_are_read() -> None:
    xml = b"""<domain><name>vm1</name><devices>
      <disk type='file'><source file='/run/ferry/vm1/vhost-user.sock'/></disk>
      <interface type='network'><source network='default'/></interface>
      <interface type='vhostuser'><source type='unix' path='/a' mode='client'/></interface>
      <channel type='unix'><source mode='bind' path='/run/ferry/vm1/x'/></channel>
    </devices></domain>"""
    assert domain_xml_untrusted(xml).sources == (VhostUserSource("unix", "/a", "client"),)


@pytest.mark.parametrize(
    "xml",
    [
        b"",
        b"<domain>",
        b"<domain><devices></domain>",
        b"\xff\xfe<\x00d",
        b"<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'>"
        b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>]><domain>&b;</domain>",
        b"<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain/>",
    ],
)
def test_hostile_xml_raises_only_the_declared_error(xml: bytes) -> None:
    with pytest.raises(DomainXmlError):
        domain_xml_untrusted(xml)


def test_deep_nesting_is_read_without_recursion() -> None:
    """No recursion, and constant work per element (not per element times depth)."""
    xml = b"<domain>" + b"<a>" * 200_000 + b"</a>" * 200_000 + b"</domain>"
    assert domain_xml_untrusted(xml).sources == ()


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_the_declared_error(data: bytes) -> None:
    with contextlib.suppress(DomainXmlError):
        domain_xml_untrusted(data)


@given(st.integers(0, 2100), st.integers(0, 40), st.binary(max_size=40))
def test_damaged_real_xml_raises_only_the_declared_error(at: int, cut: int, junk: bytes) -> None:
    real = fixture("vm1_prepare_begin.xml")
    with contextlib.suppress(DomainXmlError):
        domain_xml_untrusted(real[:at] + junk + real[at + cut :])


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("vm1_prepare_begin.xml", None),  # before libvirt chose QEMU's user
        ("vm1_start_begin.xml", "+0:+0"),  # the test's libvirt runs QEMU as root
        ("vm1_started_begin.xml", "+0:+0"),
        ("vm1_release_end.xml", None),  # the dynamic label is gone again
    ],
)
def test_qemus_dac_label_is_read_when_libvirt_has_written_it(name: str, label: str | None) -> None:
    assert domain_xml_untrusted(fixture(name)).qemu_label == label


def test_only_the_dac_seclabel_names_qemus_user() -> None:
    xml = b"""<domain><seclabel type='dynamic' model='selinux'><label>system_u:svirt_t</label>
      </seclabel><seclabel type='dynamic' model='dac'><label> +64055:+108 </label>
      <imagelabel>+1:+1</imagelabel></seclabel><devices><seclabel model='dac'><label>x</label>
      </seclabel></devices></domain>"""
    assert domain_xml_untrusted(xml).qemu_label == "+64055:+108"


@pytest.mark.parametrize(
    "xml",
    [
        b"<domain><seclabel model='dac'><label>+1:+1</label><label>+0:+0</label></seclabel>"
        b"</domain>",
        b"<domain><seclabel model='dac'><label>" + b"+1" * 1000 + b"</label></seclabel></domain>",
    ],
)
def test_a_doubtful_dac_label_is_refused(xml: bytes) -> None:
    with pytest.raises(DomainXmlError, match="DAC label"):
        domain_xml_untrusted(xml)


def test_a_dac_label_is_a_uid_and_gid() -> None:
    assert qemu_identity("+64055:+108") == (64055, 108)
    assert qemu_identity("root:root") == (0, 0)
    for label in (
        "+64055",
        "+x:+1",
        "+-1:+0",
        "+ 1:+0",
        "+4294967295:+0",
        "no-such-user-ferry:root",
        ":",
    ):
        with pytest.raises(libvirt_hook.HookError, match="DAC label"):
            qemu_identity(label)


def test_libvirts_arguments_are_four() -> None:
    assert parse_arguments(["vm1", "release", "end", "destroyed"]) == HookCall(
        "vm1", "release", "end", "destroyed"
    )
    with pytest.raises(libvirt_hook.UsageError, match="DOMAIN OPERATION"):
        parse_arguments(["vm1", "prepare", "begin"])


# ---------------------------------------------------------------------------
# main(): the XML always goes back unchanged


def run_main(
    args: str, xml: bytes, capsysbinary: pytest.CaptureFixture[bytes]
) -> tuple[int, bytes, str]:
    status = libvirt_hook.main(args.split(), io.BytesIO(xml))
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


@pytest.mark.parametrize(("args", "xml", "action"), CAPTURED + OTHERS)
def test_every_call_passes_the_xml_through_unchanged(
    args: str,
    xml: str,
    action: Action,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Calls that act are given a domain that is not ferry's, so nothing runs."""
    monkeypatch.setenv(libvirt_hook.RUNTIME_DIR_ENV, str(tmp_path / "run"))
    data = fixture(xml)
    status, out, err = run_main(args, data, capsysbinary)
    assert (status, out, err) == (0, data, "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("operation", ["prepare begin -", "release end destroyed"])
def test_malformed_xml_never_fails_a_domain(
    operation: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    data = b"<domain><devices><interface type='vhostuser'>"
    status, out, err = run_main(f"vm1 {operation}", data, capsysbinary)
    assert (status, out) == (0, data)
    assert err.startswith("ferry: domain vm1: the domain XML is not well-formed")
    assert err.endswith("not ferry's, left alone\n") and err.count("\n") == 1


def test_a_misconfigured_domain_fails_its_start_with_one_line(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """The operator sees why in libvirt's error; its release is no error."""
    data = fixture("vm1_prepare_begin.xml").replace(b"mode='client'", b"mode='server'")
    status, out, err = run_main("vm1 prepare begin -", data, capsysbinary)
    assert (status, out) == (1, data)
    assert err.count("\n") == 1
    assert err.startswith("ferry: domain vm1: the vhostuser interface's source must have")
    status, out, err = run_main("vm1 release end failed", data, capsysbinary)
    assert (status, out, err) == (0, data, "")


def test_a_call_libvirt_never_makes_is_a_usage_error(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    status, out, err = run_main("vm1 prepare", b"<domain/>", capsysbinary)
    assert (status, out) == (2, b"<domain/>")
    assert "DOMAIN OPERATION SUBOPERATION EXTRA" in err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_reads_no_xml(flag: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """An operator asking for help gets it at once, not a hook waiting on its stdin."""
    status, out, err = run_main(flag, b"<domain/>", capsysbinary)
    assert status == 0 and err == ""
    assert out.startswith(b"usage: ferry-libvirt-hook DOMAIN OPERATION SUBOPERATION EXTRA")
    assert b"<domain/>" not in out


# ---------------------------------------------------------------------------
# ferryd's command line and the pid check


def test_ferryd_gets_the_units_command_line_and_the_domains_options(tmp_path: Path) -> None:
    paths = DomainPaths("vm1", tmp_path / "run", tmp_path / "etc")
    paths.config.mkdir()
    paths.conf.write_text(
        '# vm1\'s ferryd\n; a comment too\nOTHER=1\nFERRYD_ARGS="-t 8080 -u 53  --linger 5"\n'
    )
    options = read_ferryd_args(paths.conf)
    assert options == ["-t", "8080", "-u", "53", "--linger", "5"]
    sock, ctl = str(paths.socket), str(paths.control)
    base = ["/usr/bin/ferryd", "--vhost-user", "--socket", sock, "--control", ctl]
    assert ferryd_argv("/usr/bin/ferryd", paths, options) == [*base, *options]
    paths.runtime.mkdir()
    paths.repair_socket.touch()  # ferry-repair's socket, when it is there
    assert ferryd_argv("/usr/bin/ferryd", paths, []) == [
        *base,
        "--repair-socket",
        str(paths.repair_socket),
    ]


def test_no_conf_file_is_no_options_and_a_later_line_wins(tmp_path: Path) -> None:
    conf = tmp_path / "vm1.conf"
    assert read_ferryd_args(conf) == []
    conf.write_text("FERRYD_ARGS='-4'\nFERRYD_ARGS=-6 --map-gw\n")
    assert read_ferryd_args(conf) == ["-6", "--map-gw"]
    conf.write_bytes(b"FERRYD_ARGS=\xff\n")
    with pytest.raises(libvirt_hook.HookError, match="cannot read"):
        read_ferryd_args(conf)


@pytest.mark.parametrize(
    ("cmdline", "ours"),
    [
        (["/usr/bin/python3", "/usr/bin/ferryd", "--vhost-user", "--socket", SOCKET], True),
        (["/opt/venv/bin/ferryd", "--socket", SOCKET, "--vhost-user", "-t", "80"], True),
        (["/usr/bin/python3", "/usr/bin/ferryd", "--vhost-user", "--socket", "/x.sock"], False),
        (["/usr/bin/python3", "/usr/bin/ferryd", "--socket", SOCKET], False),
        (["sleep", "100", "ferryd", "--vhost-user", "--socket", SOCKET], False),
        (["/usr/bin/python3", "/usr/bin/ferryd", "--vhost-user", SOCKET, "--socket"], False),
        ([], False),
    ],
)
def test_only_this_domains_ferryd_is_ever_signalled(cmdline: list[str], ours: bool) -> None:
    assert is_ferryd_of(cmdline, RUN) is ours
