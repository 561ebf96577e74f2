"""The README's main command: ferry's whole job, end to end, on one machine (run as root).

``make demo`` (``python -m scripts.demo``): the guest is a network
namespace (scripts/demo/namespace.py); ``make demo VM=1`` (``--vm``): the
guest is a QEMU VM on ``ferryd --vhost-user`` (scripts/demo/vm.py). Either
way:

1. two "hosts" that carry the same address and MAC (A, the source, and B,
   the target), a peer behind a bridge that A is plugged into, one
   ferry-repair (the one privileged helper): testbed/migrationbed.py;
2. ferryd in host A; the guest takes its address by DHCP from it;
3. the guest opens N TCP connections to the peer, some streaming both ways,
   every byte checked;
4. a second ferryd in host B; the guest is live-migrated from A to B while
   the streams run (``ferryctl migrate``, or QEMU's own migration through
   QMP), and the peer's link moves from A to B, as a data centre fabric
   would;
5. a connection from the peer to a port ferryd forwards reaches the guest
   through host B; every connection exchanges its last bytes and is
   checked end to end.

It prints what it does as it goes and ends with a summary table
(scripts/demo/report.py) and ``demo finished: N connections survived the
migration byte-exact.``; anything else exits non-zero with the reason.
Everything it made (namespaces, processes, sockets, QEMUs) is removed at
the end, also on failure, Ctrl-C or SIGTERM.
"""
