/*
 * cgrep-workload: the lab guest's dependent-write workload.
 *
 * Writes a chain of self-describing records (format v1, see below) round-robin
 * over every virtio disk (/sys/block/vd*), each one only after the previous one
 * was acknowledged (pwrite + fdatasync returned), and reports progress on the
 * console.  In scan mode it only reads the disks and reports what it finds.
 *
 * Record v1, little-endian, one record = one block of bs bytes:
 *   0 magic "CGREPRC1" | 8 u64 seq | 16 u32 vm | 20 u32 nvms | 24 u32 disk
 *   28 u32 ndisks | 32 u64 slot | 40 u64 slots/disk | 48 u32 bs | 52 u32 0
 *   56 u64 run id | 64..bs-4 filler (seq*131+i)&0xff | bs-4 u32 crc32(0..bs-4)
 * Placement of record n: vm = n % V; k = n / V; disk = k % D;
 *   slot = (k / D) % S; offset = slot * bs.
 *
 * Group mode (write mode with --vms V > 1): the chain spans V VMs, and this
 * VM writes record n only when told so by a host-side relay.  After the scan
 * the workload reads lines "GO <n>" from its standard input (the serial
 * console, switched to raw input without echo before the scan), writes record n (it must be
 * one of this VM's, n % V == vm) and then prints "CGREP DONE seq=<n>".  A GO
 * for the record it acknowledged last is answered with DONE again without
 * writing; a GO for another VM's record or an older record is refused with a
 * CGREP ERROR line.  The periodic ACK lines go on as in single-VM mode.
 *
 * Build: gcc -static -O2 -o cgrep-workload workload.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "CGREPRC1"
#define MAGIC_LEN 8
#define HDR_LEN 64
#define MIN_BS 4096u
#define MAX_BS (1024u * 1024u)
#define MAX_DISKS 64
#define SCAN_CHUNK (1024u * 1024u)
#define ERROR_RETRY_MS 100

enum mode { MODE_WRITE, MODE_SCAN, MODE_IDLE };

struct disk {
    char name[64];
    int serial_index; /* N from serial "cgrep-dN", or -1 */
    int index;
    int fd;
    uint64_t size;
};

static struct disk disks[MAX_DISKS];
static int ndisks;

/* ---------------------------------------------------------------- output */

static void out_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One line = one unbuffered write(2) (nothing to fflush), so lines never interleave. */
static void out_line(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (len < 0)
        return;
    if ((size_t)len > sizeof(buf) - 2)
        len = (int)sizeof(buf) - 2;
    buf[len++] = '\n';
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        len -= (int)w;
    }
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    out_line("CGREP FATAL %s", msg);
    exit(1);
}

/* ----------------------------------------------------------------- time */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until_ns(uint64_t t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(t / 1000000000ull);
    ts.tv_nsec = (long)(t % 1000000000ull);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void idle_forever(void)
{
    for (;;)
        sleep(3600);
}

/* ------------------------------------------------------------------ crc */

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
        crc_table[i] = c;
    }
}

/* CRC-32/IEEE, identical to zlib.crc32(data). */
static uint32_t crc32_ieee(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---------------------------------------------------------- byte order */

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ------------------------------------------------------------ geometry */

struct geom {
    uint32_t bs;
    uint32_t vm;
    uint32_t vms;
    uint32_t ndisks;
    uint64_t slots; /* S */
};

struct place {
    uint32_t disk;
    uint64_t slot;
};

static struct place place_of(const struct geom *g, uint64_t n)
{
    struct place pl;
    uint64_t k = n / g->vms;
    pl.disk = (uint32_t)(k % g->ndisks);
    pl.slot = (k / g->ndisks) % g->slots;
    return pl;
}

static void build_record(unsigned char *buf, const struct geom *g, uint64_t n, uint64_t run_id)
{
    struct place pl = place_of(g, n);
    memcpy(buf, MAGIC, MAGIC_LEN);
    put_u64(buf + 8, n);
    put_u32(buf + 16, (uint32_t)(n % g->vms));
    put_u32(buf + 20, g->vms);
    put_u32(buf + 24, pl.disk);
    put_u32(buf + 28, g->ndisks);
    put_u64(buf + 32, pl.slot);
    put_u64(buf + 40, g->slots);
    put_u32(buf + 48, g->bs);
    put_u32(buf + 52, 0);
    put_u64(buf + 56, run_id);
    unsigned char base = (unsigned char)(n * 131u);
    for (uint32_t i = HDR_LEN; i < g->bs - 4; i++)
        buf[i] = (unsigned char)(base + (unsigned char)i);
    put_u32(buf + g->bs - 4, crc32_ieee(buf, g->bs - 4));
}

/* ---------------------------------------------------------------- disks */

static int read_small_file(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, len - 1);
    close(fd);
    if (r < 0)
        return -1;
    buf[r] = '\0';
    while (r > 0 && (buf[r - 1] == '\n' || buf[r - 1] == ' ' || buf[r - 1] == '\0'))
        buf[--r] = '\0';
    return 0;
}

static int cmp_disk_name(const void *a, const void *b)
{
    const struct disk *x = a, *y = b;
    size_t lx = strlen(x->name), ly = strlen(y->name);
    if (lx != ly) /* vdz before vdaa */
        return lx < ly ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_disk_index(const void *a, const void *b)
{
    const struct disk *x = a, *y = b;
    return x->index - y->index;
}

/* Find /sys/block/vd*, assign indexes: serial cgrep-dN when usable, else name order. */
static void discover_disks(void)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        die("cannot open /sys/block: errno=%d", errno);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "vd", 2) != 0 || strlen(de->d_name) >= sizeof(disks[0].name))
            continue;
        if (ndisks >= MAX_DISKS)
            die("too many disks (max %d)", MAX_DISKS);
        struct disk *k = &disks[ndisks++];
        memset(k, 0, sizeof(*k));
        memcpy(k->name, de->d_name, strlen(de->d_name) + 1);
        k->fd = -1;
        k->serial_index = -1;
        char path[sizeof(k->name) + 32], serial[128];
        snprintf(path, sizeof(path), "/sys/block/%s/serial", k->name);
        if (read_small_file(path, serial, sizeof(serial)) == 0 && strncmp(serial, "cgrep-d", 7) == 0) {
            char *end;
            errno = 0;
            long v = strtol(serial + 7, &end, 10);
            if (errno == 0 && end != serial + 7 && *end == '\0' && v >= 0 && v < MAX_DISKS)
                k->serial_index = (int)v;
        }
    }
    closedir(d);
    qsort(disks, (size_t)ndisks, sizeof(disks[0]), cmp_disk_name);

    /* Serial indexes are used if they are distinct and < D; the remaining
     * disks take the free indexes in name order.  On a conflict, name order. */
    int used[MAX_DISKS] = {0};
    int ok = 1;
    for (int i = 0; i < ndisks; i++) {
        int s = disks[i].serial_index;
        if (s < 0)
            continue;
        if (s >= ndisks || used[s]) {
            ok = 0;
            break;
        }
        used[s] = 1;
    }
    if (!ok) {
        for (int i = 0; i < ndisks; i++)
            disks[i].index = i;
    } else {
        int next = 0;
        for (int i = 0; i < ndisks; i++) {
            if (disks[i].serial_index >= 0) {
                disks[i].index = disks[i].serial_index;
                continue;
            }
            while (used[next])
                next++;
            used[next] = 1;
            disks[i].index = next;
        }
    }
    qsort(disks, (size_t)ndisks, sizeof(disks[0]), cmp_disk_index);
}

static void open_disks(int flags)
{
    for (int i = 0; i < ndisks; i++) {
        char path[sizeof(disks[i].name) + 8];
        snprintf(path, sizeof(path), "/dev/%.63s", disks[i].name);
        int fd = open(path, flags | O_DIRECT | O_CLOEXEC);
        if (fd < 0)
            die("cannot open %s: errno=%d", path, errno);
        uint64_t size = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) != 0)
            die("BLKGETSIZE64 %s: errno=%d", path, errno);
        disks[i].fd = fd;
        disks[i].size = size;
    }
}

/* ----------------------------------------------------------------- scan */

struct scan_result {
    int64_t max; /* -1 when no valid record */
    uint64_t count;
    uint64_t holes;
    uint64_t bad;
};

static int record_valid_here(const unsigned char *b, const struct geom *g, uint32_t disk, uint64_t slot,
                             uint64_t *seq_out)
{
    uint64_t seq = get_u64(b + 8);
    if (get_u32(b + 20) != g->vms || get_u32(b + 28) != g->ndisks || get_u64(b + 40) != g->slots ||
        get_u32(b + 48) != g->bs || get_u32(b + 52) != 0)
        return 0;
    if (get_u32(b + 16) != (uint32_t)(seq % g->vms) || get_u32(b + 16) != g->vm)
        return 0;
    if (get_u32(b + 24) != disk || get_u64(b + 32) != slot)
        return 0;
    struct place pl = place_of(g, seq);
    if (pl.disk != disk || pl.slot != slot)
        return 0;
    *seq_out = seq;
    return 1;
}

static void scan_disks(const struct geom *g, unsigned char *buf, size_t buflen, struct scan_result *r)
{
    memset(r, 0, sizeof(*r));
    r->max = -1;
    uint64_t disk_bytes = g->slots * g->bs;
    /* Pass 1: validate and find max; pass-2 data kept small: count per seq
     * is not needed because every seq has exactly one place, so the number
     * of valid records inside the window is the number of distinct seqs. */
    uint64_t *seqs = NULL;
    size_t nseqs = 0, cap = 0;
    for (int i = 0; i < ndisks; i++) {
        uint64_t off = 0;
        while (off < disk_bytes) {
            size_t want = buflen;
            if (disk_bytes - off < want)
                want = (size_t)(disk_bytes - off);
            ssize_t got = pread(disks[i].fd, buf, want, (off_t)off);
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                die("read %s at %" PRIu64 ": errno=%d", disks[i].name, off, errno);
            }
            if (got == 0)
                die("short read on %s at %" PRIu64, disks[i].name, off);
            size_t nblk = (size_t)got / g->bs;
            if (nblk == 0)
                die("short read on %s at %" PRIu64, disks[i].name, off);
            for (size_t b = 0; b < nblk; b++) {
                const unsigned char *rec = buf + b * g->bs;
                if (memcmp(rec, MAGIC, MAGIC_LEN) != 0)
                    continue;
                uint64_t slot = off / g->bs + b;
                uint64_t seq;
                if (get_u32(rec + g->bs - 4) != crc32_ieee(rec, g->bs - 4) ||
                    !record_valid_here(rec, g, (uint32_t)disks[i].index, slot, &seq)) {
                    r->bad++;
                    continue;
                }
                r->count++;
                if ((int64_t)seq > r->max)
                    r->max = (int64_t)seq;
                if (nseqs == cap) {
                    cap = cap ? cap * 2 : 4096;
                    seqs = realloc(seqs, cap * sizeof(*seqs));
                    if (!seqs)
                        die("out of memory");
                }
                seqs[nseqs++] = seq;
            }
            off += (uint64_t)nblk * g->bs;
        }
    }
    if (r->max >= 0) {
        uint64_t max = (uint64_t)r->max;
        uint64_t window = (uint64_t)g->vms * g->ndisks * g->slots;
        uint64_t lo = max + 1 >= window ? max + 1 - window : 0;
        /* seqs of this VM in [lo, max]: n % V == vm */
        uint64_t first = lo + ((g->vm + g->vms - lo % g->vms) % g->vms);
        uint64_t expected = first > max ? 0 : (max - first) / g->vms + 1;
        uint64_t present = 0;
        for (size_t i = 0; i < nseqs; i++)
            if (seqs[i] >= lo)
                present++;
        r->holes = expected > present ? expected - present : 0;
    }
    free(seqs);
}

static void print_scan(const struct scan_result *r)
{
    out_line("CGREP SCAN max=%" PRId64 " count=%" PRIu64 " holes=%" PRIu64 " bad=%" PRIu64, r->max, r->count,
             r->holes, r->bad);
}

/* ---------------------------------------------------------------- write */

struct stats {
    uint64_t last_report_ns;
    uint64_t n;
    uint64_t lat_max_ns;
    uint64_t lat_sum_ns;
};

static void report(struct stats *st, int64_t acked, uint64_t now)
{
    uint64_t avg_us = st->n ? st->lat_sum_ns / st->n / 1000 : 0;
    out_line("CGREP ACK seq=%" PRId64 " t_ms=%" PRIu64 " n=%" PRIu64 " lat_max_us=%" PRIu64 " lat_avg_us=%" PRIu64,
             acked, (uint64_t)(now / 1000000u), st->n, st->lat_max_ns / 1000, avg_us);
    st->last_report_ns = now;
    st->n = 0;
    st->lat_max_ns = 0;
    st->lat_sum_ns = 0;
}

/* Sleep until `until`, printing reports every report_ns meanwhile. */
static void sleep_reporting(struct stats *st, int64_t acked, uint64_t until, uint64_t report_ns)
{
    for (;;) {
        uint64_t now = now_ns();
        if (now - st->last_report_ns >= report_ns) {
            report(st, acked, now);
            continue;
        }
        if (now >= until)
            return;
        uint64_t next_report = st->last_report_ns + report_ns;
        sleep_until_ns(next_report < until ? next_report : until);
    }
}

/* pwrite + fdatasync record n at its place; errors are reported and retried. */
static void write_record(const struct geom *g, unsigned char *buf, uint64_t n, uint64_t run_id, struct stats *st,
                         int64_t acked, uint64_t report_ns)
{
    build_record(buf, g, n, run_id);
    struct place pl = place_of(g, n);
    int fd = disks[pl.disk].fd;
    for (;;) {
        uint64_t t1 = now_ns();
        ssize_t w = pwrite(fd, buf, g->bs, (off_t)(pl.slot * g->bs));
        int err = 0;
        if (w < 0)
            err = errno;
        else if ((size_t)w != g->bs)
            err = EIO;
        else if (fdatasync(fd) != 0)
            err = errno;
        uint64_t t2 = now_ns();
        if (err == 0) {
            uint64_t lat = t2 - t1;
            st->n++;
            st->lat_sum_ns += lat;
            if (lat > st->lat_max_ns)
                st->lat_max_ns = lat;
            return;
        }
        if (err == EINTR)
            continue;
        out_line("CGREP ERROR seq=%" PRIu64 " errno=%d", n, err);
        sleep_reporting(st, acked, now_ns() + ERROR_RETRY_MS * 1000000ull, report_ns);
    }
}

static void write_loop(const struct geom *g, unsigned char *buf, int64_t max, uint64_t rate, uint64_t report_ms,
                       uint64_t run_id)
{
    uint64_t report_ns = report_ms * 1000000ull;
    uint64_t n;
    if (max < 0) {
        n = g->vm;
    } else {
        n = (uint64_t)max + 1;
        n += (g->vm + g->vms - n % g->vms) % g->vms;
    }
    int64_t acked = max; /* records already on disk count as acknowledged */
    struct stats st = {0};
    st.last_report_ns = now_ns();
    uint64_t t0 = st.last_report_ns;
    uint64_t issued = 0;

    for (;;) {
        if (rate > 0) {
            uint64_t due = t0 + issued * 1000000000ull / rate;
            sleep_reporting(&st, acked, due, report_ns);
        }
        write_record(g, buf, n, run_id, &st, acked, report_ns);
        acked = (int64_t)n;
        issued++;
        n += g->vms;
        uint64_t now = now_ns();
        if (now - st.last_report_ns >= report_ns)
            report(&st, acked, now);
    }
}

/* ----------------------------------------------------------- group mode */

/* Raw, echo-less input on the console so the relay's GO lines are delivered
 * byte by byte and never echoed into the console log; output flags stay as
 * they are (the console format does not change).  115200 baud shortens the
 * UART's receive timeout.  Input that arrived before (during boot) is dropped:
 * the relay sends its first GO only after the SCAN line.  Best effort: not a
 * tty, nothing to do.  Called before the scan. */
static void console_raw_input(void)
{
    struct termios t;
    if (tcgetattr(STDIN_FILENO, &t) != 0)
        return;
    t.c_lflag &= ~(tcflag_t)(ICANON | ECHO | ECHOE | ECHOK | ECHONL | ISIG | IEXTEN);
    t.c_iflag &= ~(tcflag_t)(IXON | IXOFF | ICRNL | INLCR | IGNCR | ISTRIP | BRKINT);
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    cfsetispeed(&t, B115200);
    cfsetospeed(&t, B115200);
    tcsetattr(STDIN_FILENO, TCSANOW, &t);
    tcflush(STDIN_FILENO, TCIFLUSH); /* whatever came before this is no command to us */
}

/* One command line from the relay; returns the new last acknowledged record. */
static int64_t group_command(const struct geom *g, unsigned char *buf, const char *line, int64_t acked, uint64_t run_id,
                             struct stats *st, uint64_t report_ns)
{
    if (line[0] == '\0')
        return acked;
    if (strncmp(line, "GO ", 3) != 0 || line[3] < '0' || line[3] > '9') {
        out_line("CGREP ERROR bad command '%.40s'", line);
        return acked;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(line + 3, &end, 10);
    if (errno != 0 || *end != '\0' || v > (unsigned long long)INT64_MAX) {
        out_line("CGREP ERROR bad command '%.40s'", line);
        return acked;
    }
    uint64_t n = (uint64_t)v;
    if (n % g->vms != g->vm) {
        out_line("CGREP ERROR go=%" PRIu64 " belongs to vm %" PRIu64 ", this is vm %" PRIu32, n, n % g->vms, g->vm);
        return acked;
    }
    if (acked >= 0 && (int64_t)n < acked) {
        out_line("CGREP ERROR go=%" PRIu64 " is older than the last acknowledged record %" PRId64, n, acked);
        return acked;
    }
    if ((int64_t)n != acked) {
        write_record(g, buf, n, run_id, st, acked, report_ns);
        acked = (int64_t)n;
    }
    out_line("CGREP DONE seq=%" PRIu64, n);
    return acked;
}

/* Group mode: write only the records the relay asks for, report as write_loop does. */
static void group_loop(const struct geom *g, unsigned char *buf, int64_t max, uint64_t report_ms, uint64_t run_id)
{
    uint64_t report_ns = report_ms * 1000000ull;
    int64_t acked = max;
    struct stats st = {0};
    st.last_report_ns = now_ns();
    char line[64];
    size_t len = 0;
    int overlong = 0, input_open = 1;

    for (;;) {
        uint64_t now = now_ns();
        if (now - st.last_report_ns >= report_ns) {
            report(&st, acked, now);
            continue;
        }
        if (!input_open) {
            sleep_until_ns(st.last_report_ns + report_ns);
            continue;
        }
        uint64_t wait_ns = st.last_report_ns + report_ns - now;
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        int pr = poll(&pfd, 1, (int)((wait_ns + 999999u) / 1000000u));
        if (pr <= 0)
            continue;
        char in[256];
        ssize_t r = read(STDIN_FILENO, in, sizeof(in));
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r <= 0) {
            out_line("CGREP ERROR console input closed (errno=%d)", r < 0 ? errno : 0);
            input_open = 0;
            continue;
        }
        for (ssize_t i = 0; i < r; i++) {
            char c = in[i];
            if (c == '\n' || c == '\r') {
                line[len] = '\0';
                if (overlong)
                    out_line("CGREP ERROR bad command (too long)");
                else
                    acked = group_command(g, buf, line, acked, run_id, &st, report_ns);
                len = 0;
                overlong = 0;
                now = now_ns();
                if (now - st.last_report_ns >= report_ns)
                    report(&st, acked, now);
            } else if (len < sizeof(line) - 1) {
                line[len++] = c;
            } else {
                overlong = 1;
            }
        }
    }
}

/* ----------------------------------------------------------------- main */

static uint64_t parse_u64(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
        die("bad value for %s: '%s'", opt, s);
    return (uint64_t)v;
}

/* Random per boot.  getrandom(GRND_INSECURE) never blocks: reading
 * /dev/urandom before the crng is ready makes 6.1 generate jitter entropy,
 * which takes seconds under TCG.  Mixed with the clocks in any case. */
static uint64_t make_run_id(void)
{
    uint64_t id = 0;
#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif
    if (getrandom(&id, sizeof(id), GRND_INSECURE) != (ssize_t)sizeof(id) &&
        getrandom(&id, sizeof(id), GRND_NONBLOCK) != (ssize_t)sizeof(id))
        id = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    id ^= ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) * 0x9E3779B97F4A7C15ull;
    id ^= now_ns() << 17;
    return id ? id : 1;
}

static void usage(void)
{
    die("usage: cgrep-workload [write|scan|idle] [--mode M] [--bs B] [--rate R] [--report-ms M] [--vm I] "
        "[--vms V]");
}

int main(int argc, char **argv)
{
    enum mode mode = MODE_WRITE;
    const char *mode_name = "write";
    uint64_t bs = MIN_BS, rate = 0, report_ms = 100, vm = 0, vms = 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        if (a[0] == '-' && a[1] == '-') {
            if (i + 1 >= argc)
                usage();
            val = argv[++i];
        } else {
            val = a;
            a = "--mode";
        }
        if (strcmp(a, "--mode") == 0) {
            if (strcmp(val, "write") == 0)
                mode = MODE_WRITE;
            else if (strcmp(val, "scan") == 0)
                mode = MODE_SCAN;
            else if (strcmp(val, "idle") == 0)
                mode = MODE_IDLE;
            else
                die("unknown mode '%s'", val);
            mode_name = val;
        } else if (strcmp(a, "--bs") == 0) {
            bs = parse_u64(a, val);
        } else if (strcmp(a, "--rate") == 0) {
            rate = parse_u64(a, val);
        } else if (strcmp(a, "--report-ms") == 0) {
            report_ms = parse_u64(a, val);
        } else if (strcmp(a, "--vm") == 0) {
            vm = parse_u64(a, val);
        } else if (strcmp(a, "--vms") == 0) {
            vms = parse_u64(a, val);
        } else {
            usage();
        }
    }
    if (bs < MIN_BS || bs > MAX_BS || bs % MIN_BS != 0)
        die("bs must be a multiple of 4096 in [4096, 1048576], got %" PRIu64, bs);
    if (vms < 1 || vms > 0xFFFFFFFFu || vm >= vms)
        die("need 0 <= vm < vms, got vm=%" PRIu64 " vms=%" PRIu64, vm, vms);
    if (report_ms < 1)
        report_ms = 1;
    if (report_ms > 3600000)
        report_ms = 3600000;
    if (rate > 1000000000ull)
        rate = 1000000000ull;

    crc_init();
    uint64_t run_id = make_run_id();
    discover_disks();

    struct geom g = {.bs = (uint32_t)bs, .vm = (uint32_t)vm, .vms = (uint32_t)vms, .ndisks = (uint32_t)ndisks};
    if (mode != MODE_IDLE && ndisks == 0)
        die("no virtio disks (/sys/block/vd*)");
    if (mode == MODE_IDLE) {
        /* Idle never opens the disks; sizes from sysfs, for the READY line only. */
        uint64_t s = UINT64_MAX;
        for (int i = 0; i < ndisks; i++) {
            char path[sizeof(disks[i].name) + 32], val[64];
            snprintf(path, sizeof(path), "/sys/block/%.63s/size", disks[i].name);
            uint64_t sectors = read_small_file(path, val, sizeof(val)) == 0 ? strtoull(val, NULL, 10) : 0;
            if (sectors * 512 / bs < s)
                s = sectors * 512 / bs;
        }
        g.slots = ndisks ? s : 0;
    } else {
        open_disks(mode == MODE_WRITE ? O_RDWR : O_RDONLY);
        uint64_t s = UINT64_MAX;
        for (int i = 0; i < ndisks; i++)
            if (disks[i].size / bs < s)
                s = disks[i].size / bs;
        g.slots = s;
        if (g.slots == 0)
            die("a disk is smaller than bs=%" PRIu64, bs);
    }

    out_line("CGREP READY mode=%s disks=%d bs=%" PRIu64 " slots=%" PRIu64 " vm=%" PRIu64 " vms=%" PRIu64
             " run=%016" PRIx64,
             mode_name, ndisks, bs, g.slots, vm, vms, run_id);
    if (mode == MODE_IDLE)
        idle_forever();

    size_t buflen = SCAN_CHUNK / bs * bs;
    if (buflen < bs)
        buflen = bs;
    void *mem = NULL;
    int rc = posix_memalign(&mem, 4096, buflen);
    if (rc != 0)
        die("posix_memalign: errno=%d", rc);
    unsigned char *buf = mem;

    if (mode == MODE_WRITE && g.vms > 1)
        console_raw_input();
    struct scan_result sr;
    scan_disks(&g, buf, buflen, &sr);
    print_scan(&sr);
    if (mode == MODE_SCAN) {
        out_line("CGREP SCANDONE");
        idle_forever();
    }
    if (g.vms > 1) /* mode == MODE_WRITE here */
        group_loop(&g, buf, sr.max, report_ms, run_id);
    else
        write_loop(&g, buf, sr.max, rate, report_ms, run_id);
    return 0;
}
