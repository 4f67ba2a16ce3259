/* safehookd: the audit sink that training jobs cannot write to.
 *
 * A root daemon on a UNIX seqpacket socket. Each message from a client is one audit record (a
 * JSON object). The daemon stamps it with the peer's credentials as the kernel reports them
 * (SO_PEERCRED: uid, gid, pid at connect time), a sequence number and the SHA-256 of the previous
 * line ("prev"), appends it as one line to a root-owned log, optionally forwards it to journald,
 * and answers one byte: 'O' written, 'F' refused because the disk is full (disk_full=stop), 'E'
 * not a JSON object. The client under an enforced policy stops its job on anything but 'O'.
 *
 * The chain: line N carries "prev" = sha256(line N-1 without its newline); the first line of a
 * new log carries 64 zeros. `safehook verify-log LOG` recomputes it. A restarted daemon
 * continues the chain from the last complete line of its log.
 *
 * Disk full (a real ENOSPC or the --max-bytes limit): the daemon never leaves a torn line (a
 * short write is truncated away), says so on stderr (and journald), and writes one "disk_full"
 * marker record into a reserve kept for it. disk_full=stop refuses later records ('F'), so
 * enforced jobs stop; disk_full=keep accepts them unwritten ('O'), counts them, and writes a
 * "records_lost" marker with the count as soon as a write succeeds again. */
#include "sh_config.h"
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>
#ifdef SH_HAVE_SYSTEMD
#include <systemd/sd-journal.h>
#endif

#define MAX_CLIENTS 1024
#define MAX_RECORD 65536
/* Bytes of a --max-bytes budget kept for the disk_full marker itself. */
#define MARKER_RESERVE 512

enum full_action { FULL_STOP, FULL_KEEP };

typedef struct {
    int fd;
    uid_t uid;
    gid_t gid;
    pid_t pid;
} client;

static struct {
    const char *socket_path;
    const char *log_path;
    enum full_action full;
    long long max_bytes; /* 0: no limit but the disk's */
    mode_t log_mode;
    int journal;
    int log_fd;
    off_t size;
    long long seq;
    char prev[65];
    int full_now;     /* the last write failed for space */
    long long lost;   /* records accepted unwritten under disk_full=keep */
    double lost_since;
} d;

static volatile sig_atomic_t stop_requested, reopen_requested;

static void on_signal(int sig) {
    if (sig == SIGHUP)
        reopen_requested = 1;
    else
        stop_requested = 1;
}

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "safehookd: %s\n", buf);
#ifdef SH_HAVE_SYSTEMD
    if (d.journal)
        sd_journal_print(LOG_WARNING, "safehookd: %s", buf);
#endif
}

static double now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static int mkdirs(const char *path, mode_t mode) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return -ENAMETOOLONG;
    char *slash = strrchr(buf, '/');
    if (!slash || slash == buf)
        return 0;
    *slash = '\0';
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* The hash of the last complete line of the open log, so that a restarted daemon continues the
 * chain; a torn tail (a crash mid-write on an older version, a foreign writer) is cut off and
 * its length returned in TORN. */
static int load_tail(off_t *torn) {
    struct stat st;
    *torn = 0;
    if (fstat(d.log_fd, &st) < 0)
        return -errno;
    d.size = st.st_size;
    memset(d.prev, '0', 64);
    d.prev[64] = '\0';
    d.seq = 0;
    if (st.st_size == 0)
        return 0;
    /* Read back up to the last 2 records' worth; one record is at most MAX_RECORD + stamps. */
    size_t want = st.st_size < 2 * MAX_RECORD + 4096 ? (size_t)st.st_size : 2 * MAX_RECORD + 4096;
    char *buf = malloc(want + 1);
    if (!buf)
        return -ENOMEM;
    off_t start = st.st_size - (off_t)want;
    ssize_t n = pread(d.log_fd, buf, want, start);
    if (n != (ssize_t)want) {
        free(buf);
        return n < 0 ? -errno : -EIO;
    }
    size_t end = want;
    while (end > 0 && buf[end - 1] != '\n')
        end--;
    if (end < want) {
        *torn = (off_t)(want - end);
        if (ftruncate(d.log_fd, start + (off_t)end) < 0) {
            free(buf);
            return -errno;
        }
        d.size = start + (off_t)end;
    }
    if (end == 0) {
        free(buf);
        return 0;
    }
    size_t line_end = end - 1, line_start = line_end;
    while (line_start > 0 && buf[line_start - 1] != '\n')
        line_start--;
    sh_sha256_hex(buf + line_start, line_end - line_start, d.prev);
    buf[line_end] = '\0';
    json_t *last = json_loads(buf + line_start, 0, NULL);
    d.seq = json_integer_value(json_object_get(last, "seq"));
    json_decref(last);
    free(buf);
    return 0;
}

static int open_log(void) {
    int r = mkdirs(d.log_path, 0750);
    if (r < 0)
        return r;
    int fd = open(d.log_path, O_RDWR | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, d.log_mode);
    if (fd < 0)
        return -errno;
    /* A log created by someone else, or with looser bits, is made root's and private again. */
    if (fchown(fd, geteuid(), getegid()) < 0 || fchmod(fd, d.log_mode) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    if (d.log_fd >= 0)
        close(d.log_fd);
    d.log_fd = fd;
    return 0;
}

/* Append one line (TEXT without newline) with a single write; a short write is truncated away.
 * RESERVE: whether the marker reserve is kept free (every record but the disk_full marker). */
static int append_line(const char *text, size_t len, int reserve) {
    long long budget = d.max_bytes ? d.max_bytes - (reserve ? MARKER_RESERVE : 0) : 0;
    if (d.max_bytes && (long long)d.size + (long long)len + 1 > budget)
        return -ENOSPC;
    char *line = malloc(len + 1);
    if (!line)
        return -ENOMEM;
    memcpy(line, text, len);
    line[len] = '\n';
    ssize_t n = write(d.log_fd, line, len + 1);
    int err = n < 0 ? errno : 0;
    free(line);
    if (n == (ssize_t)len + 1) {
        d.size += n;
        sh_sha256_hex(text, len, d.prev);
        return 0;
    }
    /* Never leave a torn line: the next line's "prev" would chain to bytes nobody can parse. */
    if (ftruncate(d.log_fd, d.size) < 0)
        say("cannot cut a torn line at %lld bytes: %s", (long long)d.size, strerror(errno));
    return n < 0 ? -err : -ENOSPC;
}

/* Stamp REC (owned) with the chain fields, dump it and append it. */
static int write_record(json_t *rec, int reserve) {
    json_object_set_new(rec, "seq", json_integer(d.seq + 1));
    json_object_set_new(rec, "prev", json_string(d.prev));
    char *text = json_dumps(rec, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(rec);
    if (!text)
        return -ENOMEM;
    size_t len = strlen(text);
    int r = append_line(text, len, reserve);
    if (r == 0) {
        d.seq++;
#ifdef SH_HAVE_SYSTEMD
        if (d.journal)
            sd_journal_send("MESSAGE=%s", text, "SYSLOG_IDENTIFIER=safehookd", "SAFEHOOK_SEQ=%lld", d.seq,
                            "SAFEHOOK_HASH=%s", d.prev, NULL);
#endif
    }
    free(text);
    return r;
}

static json_t *daemon_record(const char *event) {
    json_t *rec = json_object();
    json_object_set_new(rec, "event", json_string(event));
    json_object_set_new(rec, "time", json_real(now()));
    json_object_set_new(rec, "pid", json_integer(getpid()));
    json_object_set_new(rec, "peer", json_pack("{s:i,s:i,s:i}", "uid", (int)geteuid(), "gid", (int)getegid(),
                                               "pid", (int)getpid()));
    return rec;
}

static void enter_full(int err) {
    if (d.full_now)
        return;
    d.full_now = 1;
    say("cannot append to %s: %s; disk_full=%s: %s", d.log_path, strerror(-err),
        d.full == FULL_STOP ? "stop" : "keep",
        d.full == FULL_STOP ? "records are refused and enforced jobs stop"
                            : "jobs continue, records are counted and a records_lost marker follows");
    json_t *m = daemon_record("disk_full");
    json_object_set_new(m, "action", json_string(d.full == FULL_STOP ? "stop" : "keep"));
    json_object_set_new(m, "error", json_string(strerror(-err)));
    int r = write_record(m, 0);
    if (r < 0)
        say("the disk_full marker itself could not be written: %s", strerror(-r));
}

/* Returns the reply byte for one client record. */
static char handle_record(const client *c, const char *buf, size_t len) {
    json_error_t jerr;
    json_t *rec = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    const char *event = json_string_value(json_object_get(rec, "event"));
    /* The daemon's own events are its alone: a job cannot forge a daemon_stop or a marker. */
    static const char *const own[] = {"daemon_start", "daemon_stop", "disk_full", "records_lost", "log_reopened"};
    int forged = 0;
    for (size_t i = 0; event && i < sizeof own / sizeof own[0]; i++)
        forged |= !strcmp(event, own[i]);
    if (!rec || !json_is_object(rec) || !event || forged) {
        json_decref(rec);
        return 'E';
    }
    json_object_set_new(rec, "peer",
                        json_pack("{s:i,s:i,s:i}", "uid", (int)c->uid, "gid", (int)c->gid, "pid", (int)c->pid));
    if (d.lost > 0) {
        json_t *m = daemon_record("records_lost");
        json_object_set_new(m, "records", json_integer(d.lost));
        json_object_set_new(m, "since", json_real(d.lost_since));
        if (write_record(m, 1) == 0) {
            say("space again: %lld records were lost since %.0f", d.lost, d.lost_since);
            d.lost = 0;
            d.full_now = 0;
        }
    }
    int r = write_record(rec, 1);
    if (r == 0) {
        d.full_now = 0;
        return 'O';
    }
    if (r != -ENOSPC && r != -EFBIG && r != -EDQUOT)
        say("cannot append to %s: %s", d.log_path, strerror(-r));
    enter_full(r);
    if (d.full == FULL_KEEP) {
        if (d.lost++ == 0)
            d.lost_since = now();
        return 'O';
    }
    return 'F';
}

static int open_socket(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(d.socket_path) >= sizeof addr.sun_path)
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, d.socket_path);
    int r = mkdirs(d.socket_path, 0755);
    if (r < 0)
        return r;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    unlink(d.socket_path);
    /* Every user's job connects; the kernel's credentials, not the socket's mode, say who. */
    mode_t old = umask(0);
    r = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (r < 0 || chmod(d.socket_path, 0666) < 0 || listen(fd, 128) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

static int serve(int lfd) {
    static struct pollfd pfd[MAX_CLIENTS + 1];
    static client cl[MAX_CLIENTS + 1];
    static char buf[MAX_RECORD + 1];
    nfds_t n = 1;
    pfd[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    while (!stop_requested) {
        if (reopen_requested) {
            reopen_requested = 0;
            off_t torn;
            int r = open_log();
            if (r == 0)
                r = load_tail(&torn);
            if (r < 0)
                say("cannot reopen %s: %s", d.log_path, strerror(-r));
            else if (d.size == 0)
                write_record(daemon_record("log_reopened"), 1); /* chains on from the old file */
        }
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (pfd[0].revents & POLLIN) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            struct ucred uc;
            socklen_t ul = sizeof uc;
            if (fd >= 0 && (n > MAX_CLIENTS || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &ul) < 0)) {
                close(fd);
                fd = -1;
            }
            if (fd >= 0) {
                pfd[n] = (struct pollfd){.fd = fd, .events = POLLIN};
                cl[n] = (client){.fd = fd, .uid = uc.uid, .gid = uc.gid, .pid = uc.pid};
                n++;
            }
        }
        for (nfds_t i = 1; i < n; i++) {
            if (!pfd[i].revents)
                continue;
            ssize_t len = 0;
            if (pfd[i].revents & POLLIN)
                len = recv(pfd[i].fd, buf, sizeof buf, MSG_TRUNC);
            if (len > (ssize_t)MAX_RECORD) {
                char reply = 'E';
                send(pfd[i].fd, &reply, 1, MSG_NOSIGNAL);
                continue;
            }
            if (len > 0) {
                char reply = handle_record(&cl[i], buf, (size_t)len);
                send(pfd[i].fd, &reply, 1, MSG_NOSIGNAL);
                continue;
            }
            if (len < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            close(pfd[i].fd);
            pfd[i] = pfd[n - 1];
            cl[i] = cl[n - 1];
            n--;
            i--;
        }
    }
    for (nfds_t i = 1; i < n; i++)
        close(pfd[i].fd);
    return 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: safehookd [--socket PATH] [--log PATH] [--disk-full stop|keep] [--max-bytes N]\n"
            "                 [--log-mode OCTAL] [--journal]\n"
            "  --socket     UNIX socket jobs connect to (default %s)\n"
            "  --log        the hash-chained audit log (default %s)\n"
            "  --disk-full  stop: refuse records so enforced jobs stop (default); keep: jobs go on,\n"
            "               a records_lost marker follows\n"
            "  --max-bytes  treat the log as full at N bytes (a quota; tests)\n"
            "  --log-mode   permission bits of the log (default 0600; 0640 lets its group read)\n"
            "  --journal    also forward every record to journald%s\n",
            SH_AUDIT_SOCKET, SH_AUDIT_LOG,
#ifdef SH_HAVE_SYSTEMD
            ""
#else
            " (not built in: no libsystemd)"
#endif
    );
}

int main(int argc, char **argv) {
    d.socket_path = SH_AUDIT_SOCKET;
    d.log_path = SH_AUDIT_LOG;
    d.log_mode = 0600;
    d.log_fd = -1;
    static const struct option opts[] = {
        {"socket", required_argument, 0, 's'}, {"log", required_argument, 0, 'l'},
        {"disk-full", required_argument, 0, 'f'}, {"max-bytes", required_argument, 0, 'm'},
        {"log-mode", required_argument, 0, 'p'}, {"journal", no_argument, 0, 'j'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "s:l:f:m:p:jh", opts, NULL)) != -1) {
        switch (c) {
        case 's': d.socket_path = optarg; break;
        case 'l': d.log_path = optarg; break;
        case 'f':
            if (!strcmp(optarg, "stop"))
                d.full = FULL_STOP;
            else if (!strcmp(optarg, "keep"))
                d.full = FULL_KEEP;
            else {
                usage(stderr);
                return 2;
            }
            break;
        case 'm': d.max_bytes = strtoll(optarg, NULL, 10); break;
        case 'p': d.log_mode = (mode_t)strtol(optarg, NULL, 8) & 0640; break;
        case 'j': d.journal = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    off_t torn = 0;
    int r = open_log();
    if (r == 0)
        r = load_tail(&torn);
    if (r < 0) {
        say("cannot open the log %s: %s", d.log_path, strerror(-r));
        return 1;
    }
    int lfd = open_socket();
    if (lfd < 0) {
        say("cannot listen on %s: %s", d.socket_path, strerror(-lfd));
        return 1;
    }
    json_t *start = daemon_record("daemon_start");
    json_object_set_new(start, "version", json_string(SH_VERSION));
    json_object_set_new(start, "socket", json_string(d.socket_path));
    json_object_set_new(start, "disk_full", json_string(d.full == FULL_STOP ? "stop" : "keep"));
    if (torn)
        json_object_set_new(start, "torn_tail_bytes", json_integer(torn));
    r = write_record(start, 1);
    if (r < 0) {
        say("cannot write to %s: %s", d.log_path, strerror(-r));
        return 1;
    }
    r = serve(lfd);
    if (r < 0)
        say("poll: %s", strerror(-r));
    close(lfd);
    unlink(d.socket_path);
    json_t *stop = daemon_record("daemon_stop");
    if (d.lost)
        json_object_set_new(stop, "records_lost", json_integer(d.lost));
    write_record(stop, 0);
    close(d.log_fd);
    return r < 0 ? 1 : 0;
}
