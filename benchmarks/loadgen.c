/* loadgen.c: echo load generator (and stall probe) for benchmarks/bench_throughput.py.
 *
 * Compiled at run time by bench_throughput.py (cc -O2 -pthread ... -lm) into a temporary
 * directory.
 *
 *   loadgen MODE CONC DURATION SLICE WARMUP FIRST TIMEOUT PORT [PORT...]
 *   loadgen probe MAX_SECONDS
 *
 * MODE     conn: connection per request. Connect, send 64 bytes, read the 64-byte echo,
 *                read the server's end of file, close. CONC connections in flight.
 *          keep: keep-alive. CONC open connections per server, each sending 64 bytes
 *                and waiting for the echo before sending the next.
 *          udp:  one connected UDP socket per server with CONC numbered 64-byte
 *                datagrams outstanding; an echo frees its place for the next one.
 * DURATION measured seconds per server; SLICE seconds of load on one server before the
 *          next one takes over (all servers in turn, FIRST going first); WARMUP
 *          unmeasured seconds (shared by all servers, in turn) before the measurement.
 * TIMEOUT  seconds after which an unanswered connection or request counts as failed
 *          (UDP: after this long without any echo, the outstanding datagrams are
 *          counted lost and the window is refilled).
 *
 * Single-threaded, non-blocking, epoll; 127.0.0.1 only. Line protocol on stdin/stdout:
 * after the warm-up it prints "READY" and waits for one line on stdin; then it measures,
 * prints one JSON line and exits. An alarm ends it if the parent never answers.
 *
 * The JSON line: t0 (CLOCK_MONOTONIC seconds at the start of the measurement), wall, cpu
 * (this process, user + system) and per server: done (requests completed), errors, lost
 * (UDP), p50/p99 latency in microseconds (connect to end of file for conn), cpu (this
 * process's CPU time while that server was the one being loaded) and slices: for each
 * of its slices [slice number k, requests started in it and completed]; slice k covers
 * [t0 + k * SLICE, t0 + (k + 1) * SLICE).
 *
 * probe: see probe_main below (when the whole machine was not running).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64
#define MAXT 16
#define NBUCKET 600
#define RING 8192
#define UDP_SLOT 0xFFFFFFFFu

enum { IDLE = 0, CONNECTING, READING, DEAD };

typedef struct {
    int fd;
    int state;
    int got;
    int slice; /* the slice in which the request started (-1: not measured) */
    int64_t start;
} conn_t;

typedef struct {
    int port;
    struct sockaddr_in addr;
    conn_t *conns;
    /* udp */
    int ufd;
    int outstanding;
    uint64_t next_seq, min_seq;
    int64_t last_progress;
    int64_t *sent_at; /* RING entries: send time, or -1 once answered */
    uint64_t *sent_seq;
    int *sent_slice;
    /* results */
    uint64_t done, errors, lost;
    double cpu;
    uint64_t hist[NBUCKET];
    uint32_t *slice_done; /* requests completed, by the slice in which they started */
} target_t;

static const char *mode;
static int conc, ntargets;
static double timeout_s;
static target_t targets[MAXT];
static int ep;
static char payload[PAYLOAD];
/* Measured slices: the current one (-1 outside the measurement), how many, how long. */
static int cur_slice = -1, nslices;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Latency histogram: 20 buckets per doubling of microseconds (about 3.5% wide). */
static void record(target_t *t, int64_t ns, int slice) {
    if (slice >= 0 && slice < nslices) t->slice_done[slice]++;
    double us = ns / 1000.0;
    int b = (int)(20.0 * log2(us + 1.0));
    if (b < 0) b = 0;
    if (b >= NBUCKET) b = NBUCKET - 1;
    t->hist[b]++;
    t->done++;
}

static double percentile(target_t *t, double q) {
    uint64_t total = 0, seen = 0;
    for (int b = 0; b < NBUCKET; b++) total += t->hist[b];
    if (!total) return -1;
    uint64_t want = (uint64_t)ceil(q * total);
    if (want < 1) want = 1;
    for (int b = 0; b < NBUCKET; b++) {
        seen += t->hist[b];
        if (seen >= want) return exp2((b + 0.5) / 20.0) - 1.0;
    }
    return -1;
}

static uint64_t key(int ti, uint32_t slot) { return ((uint64_t)ti << 32) | slot; }

static void conn_close(conn_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = IDLE;
    c->got = 0;
}

static void fail(target_t *t, conn_t *c) {
    t->errors++;
    conn_close(c);
}

/* conn mode: send the payload; on success wait for the echo. */
static void conn_send(target_t *t, conn_t *c, int ti, uint32_t slot, int registered) {
    ssize_t n = send(c->fd, payload, PAYLOAD, MSG_NOSIGNAL);
    if (n == PAYLOAD) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = key(ti, slot)};
        if (epoll_ctl(ep, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            fail(t, c);
            return;
        }
        c->state = READING;
        c->got = 0;
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !registered) {
        struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = key(ti, slot)};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            fail(t, c);
            return;
        }
        c->state = CONNECTING;
        return;
    }
    fail(t, c);
}

static void conn_start(int ti, uint32_t slot) {
    target_t *t = &targets[ti];
    conn_t *c = &t->conns[slot];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        t->errors++;
        c->state = IDLE;
        return;
    }
    c->start = now_ns();
    c->slice = cur_slice;
    c->got = 0;
    if (connect(c->fd, (struct sockaddr *)&t->addr, sizeof t->addr) < 0 && errno != EINPROGRESS) {
        fail(t, c);
        return;
    }
    /* On loopback the handshake is usually complete already: try to send at once. */
    conn_send(t, c, ti, slot, 0);
}

static void conn_event(int ti, uint32_t slot, uint32_t events) {
    target_t *t = &targets[ti];
    conn_t *c = &t->conns[slot];
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
            fail(t, c);
            return;
        }
        conn_send(t, c, ti, slot, 1);
        return;
    }
    if (c->state != READING) return;
    char buf[512];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            c->got += n;
            if (c->got > PAYLOAD) {
                fail(t, c);
                return;
            }
            continue;
        }
        if (n == 0) {
            if (c->got == PAYLOAD) {
                record(t, now_ns() - c->start, c->slice);
                conn_close(c);
            } else {
                fail(t, c);
            }
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        fail(t, c);
        return;
    }
    (void)events;
}

/* keep mode */
static int set_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int keep_open(int ti, uint32_t slot) {
    target_t *t = &targets[ti];
    conn_t *c = &t->conns[slot];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return -1;
    /* Blocking connect, bounded by the send timeout. */
    struct timeval tv = {.tv_sec = (time_t)timeout_s, .tv_usec = (suseconds_t)((timeout_s - (time_t)timeout_s) * 1e6)};
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(c->fd, (struct sockaddr *)&t->addr, sizeof t->addr) < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (set_nonblocking(c->fd) < 0) return -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = key(ti, slot)};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) return -1;
    c->state = IDLE;
    return 0;
}

static void keep_send(target_t *t, conn_t *c) {
    c->start = now_ns();
    c->slice = cur_slice;
    c->got = 0;
    if (send(c->fd, payload, PAYLOAD, MSG_NOSIGNAL) != PAYLOAD) {
        t->errors++;
        close(c->fd);
        c->fd = -1;
        c->state = DEAD;
        return;
    }
    c->state = READING;
}

static void keep_event(int ti, uint32_t slot, int active) {
    target_t *t = &targets[ti];
    conn_t *c = &t->conns[slot];
    char buf[512];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            c->got += n;
            if (c->state != READING || c->got > PAYLOAD) break;
            if (c->got == PAYLOAD) {
                record(t, now_ns() - c->start, c->slice);
                c->state = IDLE;
                c->got = 0;
                if (active) keep_send(t, c);
                if (c->state == DEAD) return;
            }
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n < 0 && errno == EINTR) continue;
        break;
    }
    t->errors++;
    close(c->fd);
    c->fd = -1;
    c->state = DEAD;
}

/* udp mode */
static void udp_fill(target_t *t) {
    char buf[PAYLOAD];
    memcpy(buf, payload, PAYLOAD);
    while (t->outstanding < conc) {
        uint64_t seq = t->next_seq;
        memcpy(buf, &seq, sizeof seq);
        ssize_t n = send(t->ufd, buf, PAYLOAD, 0);
        if (n != PAYLOAD) {
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
            t->errors++;
            return;
        }
        t->sent_at[seq % RING] = now_ns();
        t->sent_seq[seq % RING] = seq;
        t->sent_slice[seq % RING] = cur_slice;
        t->next_seq++;
        t->outstanding++;
    }
}

static void udp_event(int ti, int active) {
    target_t *t = &targets[ti];
    char buf[2048];
    for (;;) {
        ssize_t n = recv(t->ufd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) t->errors++;
            break;
        }
        uint64_t seq;
        if (n != PAYLOAD) {
            t->errors++;
            continue;
        }
        memcpy(&seq, buf, sizeof seq);
        /* An echo counts once, and only if its datagram was not already given up on. */
        if (seq < t->min_seq || seq >= t->next_seq) continue;
        if (t->sent_seq[seq % RING] != seq || t->sent_at[seq % RING] < 0) continue;
        record(t, now_ns() - t->sent_at[seq % RING], t->sent_slice[seq % RING]);
        t->sent_at[seq % RING] = -1;
        t->outstanding--;
        t->last_progress = now_ns();
    }
    if (active) udp_fill(t);
}

/* Run the load from start for ntargets * per_target seconds, switching every slice. */
static void run(int64_t start, double per_target, double slice, int first, int measure) {
    int64_t end = start + (int64_t)(per_target * ntargets * 1e9);
    int64_t slice_ns = (int64_t)(slice * 1e9);
    int64_t timeout_ns = (int64_t)(timeout_s * 1e9);
    int is_conn = !strcmp(mode, "conn"), is_keep = !strcmp(mode, "keep");
    int prev = -1;
    double cpu_mark = cpu_s();
    int64_t last_scan = 0;
    struct epoll_event evs[256];
    for (;;) {
        int64_t now = now_ns();
        int active = -1;
        int64_t k = now < end && now >= start ? (now - start) / slice_ns : -1;
        if (k >= 0) active = (int)((k + first) % ntargets);
        cur_slice = measure ? (int)k : -1;
        if (active != prev) {
            double c = cpu_s();
            if (prev >= 0 && measure) targets[prev].cpu += c - cpu_mark;
            cpu_mark = c;
            prev = active;
            if (active >= 0 && is_keep) {
                target_t *t = &targets[active];
                for (int i = 0; i < conc; i++)
                    if (t->conns[i].state == IDLE) keep_send(t, &t->conns[i]);
            }
            if (active >= 0 && !is_conn && !is_keep) {
                targets[active].last_progress = now;
                udp_fill(&targets[active]);
            }
        }
        if (active < 0) break;
        target_t *at = &targets[active];
        if (is_conn) {
            for (int i = 0; i < conc; i++)
                if (at->conns[i].state == IDLE) conn_start(active, i);
        }
        int n = epoll_wait(ep, evs, 256, 5);
        for (int i = 0; i < n; i++) {
            int ti = (int)(evs[i].data.u64 >> 32);
            uint32_t slot = (uint32_t)evs[i].data.u64;
            if (is_conn) conn_event(ti, slot, evs[i].events);
            else if (is_keep) keep_event(ti, slot, ti == active);
            else udp_event(ti, ti == active);
        }
        now = now_ns();
        if (now - last_scan > 20000000LL) { /* time-outs, every 20 ms */
            last_scan = now;
            for (int ti = 0; ti < ntargets; ti++) {
                target_t *t = &targets[ti];
                if (is_conn || is_keep) {
                    for (int i = 0; i < conc; i++) {
                        conn_t *c = &t->conns[i];
                        if ((c->state == CONNECTING || c->state == READING) && now - c->start > timeout_ns) {
                            if (is_keep) {
                                t->errors++;
                                close(c->fd);
                                c->fd = -1;
                                c->state = DEAD;
                            } else {
                                fail(t, c);
                            }
                        }
                    }
                } else if (t->outstanding && now - t->last_progress > timeout_ns) {
                    t->lost += t->outstanding;
                    t->outstanding = 0;
                    t->min_seq = t->next_seq;
                    t->last_progress = now;
                    if (ti == active) udp_fill(t);
                }
            }
        }
    }
    cur_slice = -1;
    /* Let the requests still in flight finish (they are counted), up to the timeout. */
    int64_t drain_end = now_ns() + timeout_ns;
    while (now_ns() < drain_end) {
        int busy = 0;
        for (int ti = 0; ti < ntargets; ti++) {
            target_t *t = &targets[ti];
            if (is_conn || is_keep) {
                for (int i = 0; i < conc; i++)
                    if (t->conns[i].state == CONNECTING || t->conns[i].state == READING) busy = 1;
            } else if (t->outstanding) {
                busy = 1;
            }
        }
        if (!busy) break;
        int n = epoll_wait(ep, evs, 256, 5);
        for (int i = 0; i < n; i++) {
            int ti = (int)(evs[i].data.u64 >> 32);
            uint32_t slot = (uint32_t)evs[i].data.u64;
            if (is_conn) conn_event(ti, slot, evs[i].events);
            else if (is_keep) keep_event(ti, slot, 0);
            else udp_event(ti, 0);
        }
    }
    if (prev >= 0 && measure) targets[prev].cpu += cpu_s() - cpu_mark;
    /* Anything still unanswered failed. */
    for (int ti = 0; ti < ntargets; ti++) {
        target_t *t = &targets[ti];
        if (is_conn) {
            for (int i = 0; i < conc; i++)
                if (t->conns[i].state != IDLE) fail(t, &t->conns[i]);
        } else if (is_keep) {
            for (int i = 0; i < conc; i++)
                if (t->conns[i].state == READING) {
                    t->errors++;
                    close(t->conns[i].fd);
                    t->conns[i].fd = -1;
                    t->conns[i].state = DEAD;
                }
        } else {
            t->lost += t->outstanding;
            t->outstanding = 0;
            t->min_seq = t->next_seq;
        }
    }
}

/* ------------------------------------------------------------------ probe mode
 * One thread per CPU, pinned, sleeping PROBE_SLEEP at a time and noting every wake-up
 * that comes more than PROBE_GAP late. An interval in which every CPU's thread was late
 * is a stall of the whole machine (here: the VM not being run by its host); the
 * benchmark leaves such time out when it computes rates. The threads ask for the lowest
 * real-time priority (SCHED_FIFO 1), so that a CPU crowded with runnable benchmark
 * threads does not delay them and pass for a stall; where that is not allowed they run
 * as ordinary threads and the report says "realtime": false. Each wakes 1000 times a
 * second and does next to nothing.
 */
#define PROBE_SLEEP_NS 1000000LL
#define PROBE_GAP_NS 2000000LL
#define PROBE_MAX 200000

typedef struct {
    int cpu;
    int n;
    int64_t *from, *to;
} probe_t;

static volatile int probe_stop;
static volatile int probe_realtime = 1;

static void *probe_thread(void *arg) {
    probe_t *p = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(p->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    struct sched_param param = {.sched_priority = 1};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) != 0) probe_realtime = 0;
    struct timespec nap = {0, PROBE_SLEEP_NS};
    int64_t prev = now_ns();
    while (!probe_stop) {
        nanosleep(&nap, NULL);
        int64_t t = now_ns();
        if (t - prev > PROBE_SLEEP_NS + PROBE_GAP_NS && p->n < PROBE_MAX) {
            p->from[p->n] = prev + PROBE_SLEEP_NS;
            p->to[p->n] = t;
            p->n++;
        }
        prev = t;
    }
    return NULL;
}

static int probe_main(double max_seconds) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) < 0) return 1;
    int ncpu = CPU_COUNT(&allowed);
    probe_t *probes = calloc((size_t)ncpu, sizeof(probe_t));
    pthread_t *threads = calloc((size_t)ncpu, sizeof(pthread_t));
    int i = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && i < ncpu; cpu++) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        probes[i].cpu = cpu;
        probes[i].from = calloc(PROBE_MAX, sizeof(int64_t));
        probes[i].to = calloc(PROBE_MAX, sizeof(int64_t));
        if (pthread_create(&threads[i], NULL, probe_thread, &probes[i]) != 0) return 1;
        i++;
    }
    alarm((unsigned)max_seconds + 5);
    printf("READY\n");
    fflush(stdout);
    /* Until a line (or end of file) on stdin, at most max_seconds. */
    struct timeval tv = {(time_t)max_seconds, 0};
    fd_set rd;
    FD_ZERO(&rd);
    FD_SET(0, &rd);
    select(1, &rd, NULL, NULL, &tv);
    probe_stop = 1;
    for (int j = 0; j < ncpu; j++) pthread_join(threads[j], NULL);
    /* Intersect the CPUs' late intervals (each list is sorted and disjoint). */
    int n = probes[0].n;
    int64_t *from = malloc(sizeof(int64_t) * (size_t)(n + 1)), *to = malloc(sizeof(int64_t) * (size_t)(n + 1));
    memcpy(from, probes[0].from, sizeof(int64_t) * (size_t)n);
    memcpy(to, probes[0].to, sizeof(int64_t) * (size_t)n);
    for (int j = 1; j < ncpu; j++) {
        probe_t *p = &probes[j];
        int64_t *nf = malloc(sizeof(int64_t) * (size_t)(n + p->n + 1)), *nt = malloc(sizeof(int64_t) * (size_t)(n + p->n + 1));
        int a = 0, b = 0, m = 0;
        while (a < n && b < p->n) {
            int64_t lo = from[a] > p->from[b] ? from[a] : p->from[b];
            int64_t hi = to[a] < p->to[b] ? to[a] : p->to[b];
            if (lo < hi) {
                nf[m] = lo;
                nt[m] = hi;
                m++;
            }
            if (to[a] < p->to[b]) a++;
            else b++;
        }
        free(from);
        free(to);
        from = nf;
        to = nt;
        n = m;
    }
    printf("{\"cpus\": %d, \"realtime\": %s, \"stalls\": [", ncpu, probe_realtime ? "true" : "false");
    for (int j = 0; j < n; j++) printf("%s[%.6f, %.6f]", j ? ", " : "", from[j] / 1e9, to[j] / 1e9);
    /* Each CPU's own late intervals too: a stall of one CPU alone freezes what runs there. */
    printf("], \"late\": [");
    for (int j = 0; j < ncpu; j++) {
        printf("%s[", j ? ", " : "");
        for (int k = 0; k < probes[j].n; k++)
            printf("%s[%.6f, %.6f]", k ? ", " : "", probes[j].from[k] / 1e9, probes[j].to[k] / 1e9);
        printf("]");
    }
    printf("]}\n");
    fflush(stdout);
    return 0;
}

static void reset_counters(void) {
    for (int ti = 0; ti < ntargets; ti++) {
        target_t *t = &targets[ti];
        t->done = t->errors = t->lost = 0;
        t->cpu = 0;
        memset(t->hist, 0, sizeof t->hist);
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "probe")) return probe_main(atof(argv[2]));
    if (argc < 9) {
        fprintf(stderr, "usage: %s conn|keep|udp CONC DURATION SLICE WARMUP FIRST TIMEOUT PORT...\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    conc = atoi(argv[2]);
    double duration = atof(argv[3]), slice = atof(argv[4]), warmup = atof(argv[5]);
    int first = atoi(argv[6]);
    timeout_s = atof(argv[7]);
    ntargets = argc - 8;
    nslices = (int)ceil(duration * ntargets / slice - 1e-9);
    if (ntargets > MAXT || nslices > 1000000 || conc < 1 || conc > 4096 || duration <= 0 || slice <= 0 || timeout_s <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    if (strcmp(mode, "conn") && strcmp(mode, "keep") && strcmp(mode, "udp")) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    /* Bounded: the parent has this long to say GO and read the result. */
    alarm((unsigned)(warmup + duration * ntargets + 6 * timeout_s + 60));
    for (int i = 0; i < PAYLOAD; i++) payload[i] = "0123456789abcdef"[i % 16];
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) return 1;
    for (int ti = 0; ti < ntargets; ti++) {
        target_t *t = &targets[ti];
        t->port = atoi(argv[8 + ti]);
        t->addr.sin_family = AF_INET;
        t->addr.sin_port = htons((uint16_t)t->port);
        t->addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        t->conns = calloc((size_t)conc, sizeof(conn_t));
        t->slice_done = calloc((size_t)nslices + 1, sizeof(uint32_t));
        for (int i = 0; i < conc; i++) t->conns[i].fd = -1;
        t->ufd = -1;
        if (!strcmp(mode, "keep")) {
            for (int i = 0; i < conc; i++)
                if (keep_open(ti, (uint32_t)i) < 0) {
                    fprintf(stderr, "cannot open keep-alive connection to port %d: %s\n", t->port, strerror(errno));
                    return 1;
                }
        } else if (!strcmp(mode, "udp")) {
            t->ufd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (t->ufd < 0 || connect(t->ufd, (struct sockaddr *)&t->addr, sizeof t->addr) < 0) return 1;
            t->sent_at = calloc(RING, sizeof(int64_t));
            t->sent_seq = calloc(RING, sizeof(uint64_t));
            t->sent_slice = calloc(RING, sizeof(int));
            for (int i = 0; i < RING; i++) t->sent_seq[i] = UINT64_MAX;
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = key(ti, UDP_SLOT)};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, t->ufd, &ev) < 0) return 1;
        }
    }
    if (warmup > 0) run(now_ns(), warmup / ntargets, warmup / ntargets, first, 0);
    reset_counters();
    printf("READY\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int64_t t0 = now_ns();
    run(t0, duration, slice, first, 1);
    double wall = (now_ns() - t0) / 1e9;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    printf("{\"t0\": %.6f, \"wall\": %.6f, \"cpu\": %.6f, \"targets\": [", t0 / 1e9, wall, cpu);
    for (int ti = 0; ti < ntargets; ti++) {
        target_t *t = &targets[ti];
        printf("%s{\"port\": %d, \"done\": %llu, \"errors\": %llu, \"lost\": %llu, \"cpu\": %.6f, "
               "\"p50_us\": %.1f, \"p99_us\": %.1f, \"slices\": [",
               ti ? ", " : "", t->port, (unsigned long long)t->done, (unsigned long long)t->errors,
               (unsigned long long)t->lost, t->cpu, percentile(t, 0.5), percentile(t, 0.99));
        /* [slice number, requests started in it and completed] for this server's slices. */
        int comma = 0;
        for (int k = 0; k < nslices; k++)
            if ((k + first) % ntargets == ti) printf("%s[%d, %u]", comma++ ? ", " : "", k, t->slice_done[k]);
        printf("]}");
    }
    printf("]}\n");
    fflush(stdout);
    for (int ti = 0; ti < ntargets; ti++) {
        target_t *t = &targets[ti];
        for (int i = 0; i < conc; i++)
            if (t->conns[i].fd >= 0) close(t->conns[i].fd);
        if (t->ufd >= 0) close(t->ufd);
    }
    return 0;
}
