"""Linux socket constants Python's socket module lacks, defined once for ferryd.

Each comes from the uapi header named beside it; they are ABI, so fixed
numbers are safe. (ferry-repair keeps the few it needs itself: the helper
imports nothing of ferryd's. TCP's option kinds and largest window scale
are the wire's, in ferryd.wire.tcp.)
"""

from typing import Final

# include/uapi/linux/tcp.h, asm-generic/socket.h, linux/sockios.h

TCP_REPAIR_QUEUE: Final = 20
TCP_QUEUE_SEQ: Final = 21
TCP_REPAIR_OPTIONS: Final = 22
TCP_TIMESTAMP: Final = 24
TCP_REPAIR_WINDOW: Final = 29
TCP_NO_QUEUE: Final = 0
TCP_RECV_QUEUE: Final = 1
TCP_SEND_QUEUE: Final = 2

#: tcpi_options bits (TCPI_OPT_*).
OPT_TIMESTAMPS: Final = 1
OPT_SACK: Final = 2
OPT_WSCALE: Final = 4

SO_PEEK_OFF: Final = 42
SO_BUF_LOCK: Final = 72  # Linux 5.14: SOCK_SNDBUF_LOCK (1) | SOCK_RCVBUF_LOCK (2)

SIOCINQ: Final = 0x541B  # FIONREAD
SIOCOUTQ: Final = 0x5411  # TIOCOUTQ
SIOCOUTQNSD: Final = 0x894B
