"""The test bed: real namespaces, ferryd and ferry-repair processes, checked traffic.

Tests (tests/integration), benchmarks (bench/) and the demo (scripts/demo.py)
run ferry the way a user does, on real kernels; this package is what they
share, so that none of them imports another's tests. It is not installed:
it is imported from the repository's root, like tests/ and bench/.

Layers, each importing only those above it:

* :mod:`testbed.wait` (polling with a deadline) and :mod:`testbed.paths`
  (the venv's programs and the tools below);
* :mod:`testbed.netns` (one namespace that always goes away) and
  :mod:`testbed.topology` (namespaces wired as hosts, a peer and a guest);
* :mod:`testbed.ferryd_process` (a ferryd started, ready, stopped),
  :mod:`testbed.repair` (a ferry-repair and its log), and
  :mod:`testbed.migrationbed` (both hosts of a migration with their ferryds);
* :mod:`testbed.streams` drives ``streamtool`` processes and checks their
  traffic end to end;
* virtual machines: :mod:`testbed.guest_image` (the test guest, built from
  Debian packages into a cache), :mod:`testbed.qmp` (a QMP client),
  :mod:`testbed.vm` (QEMU running the guest, with a command channel into
  it) and :mod:`testbed.passt_process` (passt, the reference back-end).

The tools are stand-alone scripts run inside namespaces by path
(:mod:`testbed.paths`), importing only the standard library and ``ferryd``:
``tcptool.py`` (checked TCP streams, scenario servers), ``streamtool.py``
(thousands of checked connections across a migration), ``udptool.py``
(a checked UDP echo) and ``rawframes.py`` (hand-made frames on the guest's
tap). pytest appears only in tests/: the bed raises AssertionErrors
(``WaitTimeout``, ``FerrydFailed``) that a test reports as failures.
"""
