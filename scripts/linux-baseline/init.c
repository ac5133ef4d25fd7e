/*
 * The /init of unipeer's Linux baseline (`unipeer bench boot --baseline-linux`).
 *
 * Built at bench time with `cc -static -Os` and packed into an initramfs next to the virtio-net
 * modules of the same Debian kernel package. It:
 *   1. prints USER_MARKER on the console as soon as it runs ("user space reached");
 *   2. loads /mod/00.ko, /mod/01.ko, ... in order with finit_module (the host wrote them there
 *      in dependency order), passing the parameters listed in /mod/NN.params if present;
 *   3. waits (bounded) for eth0, gives it 10.0.2.15/24 and brings it up (ioctl);
 *   4. runs a UDP echo server on port 7007 and prints ECHO_MARKER once it listens.
 * Any failure prints a line starting with FAIL_MARKER and powers the VM off.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define USER_MARKER "unipeer-linux-baseline: user space reached"
#define ECHO_MARKER "unipeer-linux-baseline: echo listening on udp"
#define FAIL_MARKER "unipeer-linux-baseline: FAILED"
#define ECHO_PORT 7007
#define IFACE "eth0"
/* How long to wait for the NIC to appear after its driver loaded. */
#define IFACE_WAIT_MS 10000

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	ssize_t off = 0;
	while (off < n) {
		ssize_t w = write(1, buf + off, n - off);
		if (w <= 0)
			return;
		off += w;
	}
}

static void fail(const char *what)
{
	say(FAIL_MARKER " %s: %s", what, strerror(errno));
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void ensure_console(void)
{
	if (fcntl(1, F_GETFD) != -1)
		return;
	/* No console from the kernel: mount devtmpfs and open it ourselves. */
	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
}

static void read_params(const char *path, char *out, size_t cap)
{
	out[0] = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = read(fd, out, cap - 1);
	close(fd);
	if (n < 0)
		n = 0;
	out[n] = 0;
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
		out[--n] = 0;
}

static int load_modules(void)
{
	int loaded = 0;
	for (int i = 0; i < 100; i++) {
		char path[64], ppath[64], params[512];
		snprintf(path, sizeof path, "/mod/%02d.ko", i);
		snprintf(ppath, sizeof ppath, "/mod/%02d.params", i);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			if (errno == ENOENT)
				break;
			fail(path);
		}
		read_params(ppath, params, sizeof params);
		if (syscall(SYS_finit_module, fd, params, 0) != 0 && errno != EEXIST)
			fail(path);
		close(fd);
		loaded++;
	}
	return loaded;
}

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static void set_addr(int s, unsigned long req, const char *ip, const char *what)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strncpy(ifr.ifr_name, IFACE, IFNAMSIZ - 1);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, ip, &sin->sin_addr);
	if (ioctl(s, req, &ifr) != 0)
		fail(what);
}

static void configure_iface(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("socket");
	struct ifreq ifr;
	/* The driver may register the device asynchronously: poll for it, bounded. */
	int waited = 0;
	for (;;) {
		memset(&ifr, 0, sizeof ifr);
		strncpy(ifr.ifr_name, IFACE, IFNAMSIZ - 1);
		if (ioctl(s, SIOCGIFINDEX, &ifr) == 0)
			break;
		if (waited >= IFACE_WAIT_MS)
			fail("no " IFACE " after loading the modules");
		sleep_ms(5);
		waited += 5;
	}
	set_addr(s, SIOCSIFADDR, "10.0.2.15", "SIOCSIFADDR");
	set_addr(s, SIOCSIFNETMASK, "255.255.255.0", "SIOCSIFNETMASK");
	memset(&ifr, 0, sizeof ifr);
	strncpy(ifr.ifr_name, IFACE, IFNAMSIZ - 1);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
		fail("SIOCGIFFLAGS");
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0)
		fail("SIOCSIFFLAGS");
	close(s);
}

int main(void)
{
	ensure_console();
	say(USER_MARKER);
	int n = load_modules();
	configure_iface();
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("socket");
	struct sockaddr_in addr;
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_port = htons(ECHO_PORT);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(s, (struct sockaddr *)&addr, sizeof addr) != 0)
		fail("bind");
	say(ECHO_MARKER " %d (%s 10.0.2.15/24, %d modules)", ECHO_PORT, IFACE, n);
	static char buf[65536];
	for (;;) {
		struct sockaddr_in from;
		socklen_t fl = sizeof from;
		ssize_t r = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			fail("recvfrom");
		}
		sendto(s, buf, (size_t)r, 0, (struct sockaddr *)&from, fl);
	}
}
