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
 *
 * `unipeer bench apps` packs the same init with Redis (the host's redis-server and the shared
 * libraries it links) and a /etc/unipeer-baseline.conf of `key=value` lines:
 *   addr=A.B.C.D      eth0's address (default 10.0.2.15)
 *   netmask=A.B.C.D   its mask (default 255.255.255.0)
 *   exec=redis        instead of step 4: mount /proc, /sys and /dev, bring lo up, print
 *                     REDIS_MARKER and exec /usr/bin/redis-server bound to addr:6379 with
 *                     protected mode and persistence off (it then prints its own ready line).
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
#define REDIS_MARKER "unipeer-linux-baseline: exec redis-server"
#define CONF_PATH "/etc/unipeer-baseline.conf"
#define REDIS_PATH "/usr/bin/redis-server"
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

/* The settings of /etc/unipeer-baseline.conf (defaults: the echo baseline's). */
struct conf {
	char addr[16];
	char netmask[16];
	char exec[16];
};

/* Copies the value of `key=` from `text` into `out` (at most cap - 1 bytes), if present. */
static void conf_value(const char *text, const char *key, char *out, size_t cap)
{
	size_t klen = strlen(key);
	const char *line = text;
	while (line && *line) {
		if (strncmp(line, key, klen) == 0 && line[klen] == '=') {
			const char *v = line + klen + 1;
			size_t n = strcspn(v, "\n \t\r");
			if (n >= cap)
				n = cap - 1;
			memcpy(out, v, n);
			out[n] = 0;
			return;
		}
		line = strchr(line, '\n');
		if (line)
			line++;
	}
}

static void read_conf(struct conf *c)
{
	strcpy(c->addr, "10.0.2.15");
	strcpy(c->netmask, "255.255.255.0");
	c->exec[0] = 0;
	char text[1024];
	read_params(CONF_PATH, text, sizeof text);
	conf_value(text, "addr", c->addr, sizeof c->addr);
	conf_value(text, "netmask", c->netmask, sizeof c->netmask);
	conf_value(text, "exec", c->exec, sizeof c->exec);
	struct in_addr probe;
	if (inet_pton(AF_INET, c->addr, &probe) != 1 || inet_pton(AF_INET, c->netmask, &probe) != 1) {
		errno = EINVAL;
		fail(CONF_PATH ": bad addr or netmask");
	}
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

static void iface_up(int s, const char *name, const char *what)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
		fail(what);
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0)
		fail(what);
}

static void configure_iface(const struct conf *c)
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
	set_addr(s, SIOCSIFADDR, c->addr, "SIOCSIFADDR");
	set_addr(s, SIOCSIFNETMASK, c->netmask, "SIOCSIFNETMASK");
	iface_up(s, IFACE, "bringing " IFACE " up");
	close(s);
}

/* Replaces the init with Redis on the guest's address (never returns). */
static void exec_redis(const struct conf *c)
{
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mkdir("/tmp", 01777);
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		fail("mounting /proc");
	if (mount("sysfs", "/sys", "sysfs", 0, NULL) != 0)
		fail("mounting /sys");
	/* /dev/urandom and /dev/null for Redis; the console stays open on fds 0-2. */
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0 && errno != EBUSY)
		fail("mounting /dev");
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("socket");
	iface_up(s, "lo", "bringing lo up");
	close(s);
	if (chdir("/tmp") != 0)
		fail("chdir /tmp");
	say(REDIS_MARKER " on %s:6379", c->addr);
	char *argv[] = {"redis-server", "--bind", (char *)c->addr, "--port", "6379",
			"--protected-mode", "no", "--save", "", "--appendonly", "no",
			"--daemonize", "no", "--logfile", "", NULL};
	char *envp[] = {"HOME=/tmp", "PATH=/usr/bin", NULL};
	execve(REDIS_PATH, argv, envp);
	fail("exec " REDIS_PATH);
}

int main(void)
{
	ensure_console();
	say(USER_MARKER);
	struct conf c;
	read_conf(&c);
	int n = load_modules();
	configure_iface(&c);
	if (strcmp(c.exec, "redis") == 0)
		exec_redis(&c);
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
	say(ECHO_MARKER " %d (%s %s/%s, %d modules)", ECHO_PORT, IFACE, c.addr, c.netmask, n);
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
