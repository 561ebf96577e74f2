"""A ferry-repair client in a process of its own, for test_repair_fairness.py.

``python repair_batch_client.py SOCKET COMMAND`` reads a JSON list of
descriptor numbers (inherited from the test) on its first stdin line,
connects to the helper at SOCKET, sends all of them as batches of at most
SCM_MAX_FD with the one-byte COMMAND (0 or 1), every batch before reading
any reply (pipelined, as ferryd does), prints ``{"sent": BATCHES}``, then
reads one reply per batch and prints ``{"replies": HEX}``.
"""

from __future__ import annotations

import array
import json
import socket
import sys

SCM_MAX_FD = 253  # passt-repair's batch size (include/net/scm.h); ferry_repair.protocol


def main(path: str, command: int) -> None:
    fds: list[int] = json.loads(sys.stdin.readline())
    batches = [fds[i : i + SCM_MAX_FD] for i in range(0, len(fds), SCM_MAX_FD)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as helper:
        helper.connect(path)
        for batch in batches:
            rights = array.array("i", batch)
            helper.sendmsg([bytes([command])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        print(json.dumps({"sent": len(batches)}), flush=True)
        replies = b""
        while len(replies) < len(batches):
            chunk = helper.recv(len(batches) - len(replies))
            if not chunk:
                break
            replies += chunk
    print(json.dumps({"replies": replies.hex()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
