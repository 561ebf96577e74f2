/*
 * guest_conns: many checked TCP connections from inside the test guest.
 *
 * Built statically at image-build time (testbed/guest_image.py) and run in
 * the busybox guest as /bin/guest_conns. One process, one poll() loop: a
 * thousand busybox nc processes fed by FIFOs are too slow to start and to
 * drive under TCG, this is not.
 *
 *   guest_conns ADDR PORT COUNT BUSY RATE TIMEOUT
 *
 * Opens COUNT IPv4 connections to an echo server at ADDR:PORT (at most 64
 * handshakes at a time). Every byte a connection sends is a deterministic
 * function of (connection number, offset), so what the echo server sends
 * back is checked byte by byte without being stored: a byte lost, repeated
 * or reordered either way changes what comes back.
 *
 * Phase 1: every connection sends CHUNK bytes and reads them back. The
 * first BUSY connections then keep streaming both ways, together at most
 * RATE bytes per second (0: no limit), with at most WINDOW bytes not yet
 * echoed each. Once every connection has had its first CHUNK echoed the
 * program prints "ready COUNT" on stdout.
 *
 * Phase 2 starts with SIGUSR1 (after a migration): every connection sends
 * another CHUNK bytes, waits for the echo of everything it sent, shuts
 * down its writing side and waits for the server's EOF. At the end (all
 * finished, or TIMEOUT seconds after SIGUSR1) it prints
 * "done ok=N failed=M echoed=E sent=BYTES" (E: the connections that got
 * every byte back checked, whether or not their close then completed;
 * BYTES: sent in all) and, on stderr, why each failed one
 * failed (at most 20 lines); it exits 0 only if every connection is ok.
 * Exit 2: it could not start (bad arguments, a connection refused).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 1000
#define WINDOW (64 * 1024)
#define BLOCK 16384
#define MAX_PENDING_CONNECTS 64

enum state { CONNECTING, RUNNING, CLOSING, OK, FAILED };

struct conn {
	int fd;
	enum state state;
	uint64_t sent;   /* bytes written so far */
	uint64_t echoed; /* bytes read back and checked so far */
	uint64_t target; /* bytes to send in this phase (UINT64_MAX: stream) */
	int echoed_all;  /* phase 2: everything sent came back checked (before the close) */
	char why[96];
};

static volatile sig_atomic_t go_phase2;

static void on_usr1(int sig)
{
	(void)sig;
	go_phase2 = 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* splitmix64: the stream's 8-byte word number w of connection i. */
static uint64_t word(uint64_t i, uint64_t w)
{
	uint64_t z = (i << 40) ^ w ^ 0x9E3779B97F4A7C15ull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* The bytes [off, off + len) of connection i's stream. */
static void fill(uint64_t i, uint64_t off, unsigned char *buf, size_t len)
{
	for (size_t k = 0; k < len; k++) {
		uint64_t o = off + k;
		buf[k] = (unsigned char)(word(i, o >> 3) >> (8 * (o & 7)));
	}
}

static void fail(struct conn *c, const char *fmt, long long a, long long b)
{
	c->state = FAILED;
	snprintf(c->why, sizeof(c->why), fmt, a, b);
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

static int start_connect(struct sockaddr_in *sa)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)sa, sizeof(*sa)) < 0 && errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: guest_conns ADDR PORT COUNT BUSY RATE TIMEOUT\n");
		return 2;
	}
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
		fprintf(stderr, "guest_conns: not an IPv4 address: %s\n", argv[1]);
		return 2;
	}
	long count = atol(argv[3]), busy = atol(argv[4]);
	double rate = atof(argv[5]), timeout = atof(argv[6]);
	if (count < 1 || busy < 0 || busy > count) {
		fprintf(stderr, "guest_conns: need COUNT >= 1 and 0 <= BUSY <= COUNT\n");
		return 2;
	}
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	signal(SIGPIPE, SIG_IGN);
	signal(SIGUSR1, on_usr1);

	struct conn *c = calloc(count, sizeof(*c));
	struct pollfd *p = calloc(count, sizeof(*p));
	unsigned char *out = malloc(BLOCK), *in = malloc(BLOCK), *want = malloc(BLOCK);
	if (!c || !p || !out || !in || !want)
		return 2;

	/* Connect, MAX_PENDING_CONNECTS handshakes at a time. */
	long opened = 0, established = 0;
	while (established < count) {
		long pending = 0;
		for (long i = 0; i < opened; i++)
			pending += c[i].state == CONNECTING;
		while (opened < count && pending < MAX_PENDING_CONNECTS) {
			c[opened].fd = start_connect(&sa);
			if (c[opened].fd < 0) {
				fprintf(stderr, "guest_conns: socket/connect %ld: %s\n", opened, strerror(errno));
				return 2;
			}
			c[opened].state = CONNECTING;
			opened++;
			pending++;
		}
		long n = 0;
		for (long i = 0; i < opened; i++)
			if (c[i].state == CONNECTING) {
				p[n].fd = c[i].fd;
				p[n].events = POLLOUT;
				n++;
			}
		if (poll(p, n, 10000) <= 0) {
			fprintf(stderr, "guest_conns: connecting: %s\n", n ? "no progress in 10 s" : "?");
			return 2;
		}
		for (long i = 0, k = 0; i < opened; i++) {
			if (c[i].state != CONNECTING)
				continue;
			if (p[k].revents) {
				int err = 0;
				socklen_t len = sizeof(err);
				getsockopt(c[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err) {
					fprintf(stderr, "guest_conns: connect %ld: %s\n", i, strerror(err));
					return 2;
				}
				c[i].state = RUNNING;
				c[i].target = i < busy ? UINT64_MAX : CHUNK;
				established++;
			}
			k++;
		}
	}

	int phase = 1, announced = 0;
	double started = now(), deadline = 0;
	uint64_t busy_sent = 0;
	for (;;) {
		if (go_phase2 && phase == 1) {
			phase = 2;
			deadline = now() + timeout;
			for (long i = 0; i < count; i++)
				if (c[i].state == RUNNING)
					c[i].target = c[i].sent + CHUNK;
		}
		long live = 0, first_done = 0;
		double allowed = rate > 0 ? CHUNK * (double)busy + rate * (now() - started) : 1e300;
		for (long i = 0; i < count; i++) {
			struct conn *k = &c[i];
			p[i].fd = -1;
			p[i].events = 0;
			if (k->state == OK || k->state == FAILED) {
				first_done++;
				continue;
			}
			live++;
			if (k->echoed >= CHUNK)
				first_done++;
			p[i].fd = k->fd;
			p[i].events = POLLIN;
			int streaming = k->target == UINT64_MAX;
			if (k->state == RUNNING && k->sent < k->target &&
			    (!streaming || (k->sent - k->echoed < WINDOW && busy_sent < allowed)))
				p[i].events |= POLLOUT;
		}
		if (phase == 1 && !announced && first_done == count) {
			printf("ready %ld\n", count);
			fflush(stdout);
			announced = 1;
		}
		if (live == 0 || (phase == 2 && now() > deadline))
			break;
		int r = poll(p, count, rate > 0 && busy ? 10 : 1000);
		if (r < 0 && errno != EINTR) {
			perror("guest_conns: poll");
			return 2;
		}
		if (r <= 0)
			continue;
		for (long i = 0; i < count; i++) {
			struct conn *k = &c[i];
			if (p[i].fd < 0 || !p[i].revents)
				continue;
			if (p[i].revents & POLLOUT) {
				uint64_t left = k->target - k->sent;
				size_t len = left < BLOCK ? (size_t)left : BLOCK;
				fill(i, k->sent, out, len);
				ssize_t n = send(k->fd, out, len, MSG_DONTWAIT | MSG_NOSIGNAL);
				if (n < 0 && errno != EAGAIN && errno != EINTR) {
					fail(k, "send after %lld bytes: errno %lld", (long long)k->sent, errno);
					continue;
				}
				if (n > 0) {
					k->sent += n;
					if (i < busy)
						busy_sent += n;
				}
			}
			if (p[i].revents & (POLLIN | POLLERR | POLLHUP)) {
				ssize_t n = recv(k->fd, in, BLOCK, MSG_DONTWAIT);
				if (n < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				if (n < 0) {
					fail(k, "recv after %lld echoed bytes: errno %lld", (long long)k->echoed,
					     errno);
					continue;
				}
				if (n == 0) {
					if (k->state == CLOSING && k->echoed == k->sent) {
						k->state = OK;
						close(k->fd);
						k->fd = -1;
					} else {
						fail(k, "EOF from the server after %lld of %lld bytes echoed",
						     (long long)k->echoed, (long long)k->sent);
					}
					continue;
				}
				if (k->echoed + n > k->sent) {
					fail(k, "%lld bytes echoed, only %lld sent", (long long)(k->echoed + n),
					     (long long)k->sent);
					continue;
				}
				fill(i, k->echoed, want, n);
				if (memcmp(in, want, n) != 0) {
					size_t at = 0;
					while (in[at] == want[at])
						at++;
					fail(k, "echoed byte %lld differs (%lld sent)", (long long)(k->echoed + at),
					     (long long)k->sent);
					continue;
				}
				k->echoed += n;
			}
			if (phase == 2 && k->state == RUNNING && k->sent == k->target &&
			    k->echoed == k->sent) {
				k->echoed_all = 1;
				if (shutdown(k->fd, SHUT_WR) < 0)
					fail(k, "shutdown after %lld bytes: errno %lld", (long long)k->sent, errno);
				else
					k->state = CLOSING;
			}
		}
	}

	long ok = 0, failed = 0, shown = 0, echoed_all = 0;
	unsigned long long total = 0;
	for (long i = 0; i < count; i++) {
		total += c[i].sent;
		echoed_all += c[i].echoed_all;
		if (c[i].state == OK) {
			ok++;
			continue;
		}
		failed++;
		if (c[i].state != FAILED)
			snprintf(c[i].why, sizeof(c[i].why), "timeout: %llu sent, %llu echoed",
				 (unsigned long long)c[i].sent, (unsigned long long)c[i].echoed);
		if (shown++ < 20)
			fprintf(stderr, "connection %ld: %s\n", i, c[i].why);
	}
	printf("done ok=%ld failed=%ld echoed=%ld sent=%llu\n", ok, failed, echoed_all, total);
	fflush(stdout);
	return failed ? 1 : 0;
}
