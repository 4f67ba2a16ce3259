/* safehookd's log: one JSON record per line, each stamped with "seq" (one more than the line
 * before) and "prev" (the SHA-256 of the line before, without its newline; 64 zeros on the
 * first line of a chain). `safehook verify-log` recomputes it.
 *
 * Recovery: a restarted daemon cuts a torn tail (a crash mid-write, a foreign writer) and
 * continues the chain from the last complete line, however long that line is (a client's 64 KB
 * record escapes to about 192 KB).
 *
 * Rotation: on SIGHUP the path is opened again; a new, empty file starts with "log_reopened",
 * whose "prev" is the hash of the old file's last line and whose "seq" continues, so the two
 * files are one chain (`safehook verify-log OLD NEW`).
 *
 * Disk full (a real ENOSPC or --max-bytes): the daemon never leaves a torn line (a short write
 * is cut away), and the disk_full marker always has room: the file keeps at least
 * SH_RESERVE bytes allocated past its end (fallocate with FALLOC_FL_KEEP_SIZE), and only the
 * marker may write into them. disk_full=stop refuses later records ('F'), so enforced jobs
 * stop; disk_full=keep accepts them unwritten, counts them, and writes "records_lost" with the
 * count as soon as a write succeeds again. */
#include "sh_config.h"
#include "sha256.h"
#include "shd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef SH_HAVE_SYSTEMD
#include <systemd/sd-journal.h>
#endif

/* Bytes kept for the disk_full marker: allocated past the end of the file (real disks), and
 * left unused of a --max-bytes budget (QUOTA_RESERVE). */
#define SH_RESERVE 8192
#define QUOTA_RESERVE 512
/* Allocation ahead of the end of the log, so that fallocate runs about once per MiB. */
#define ALLOC_CHUNK (1 << 20)
#define SCAN_CHUNK 65536

static struct {
    int fd;
    off_t size;
    off_t alloc_end;  /* bytes allocated from the start of the file (past the end: the reserve) */
    int can_allocate; /* the filesystem supports fallocate(KEEP_SIZE) */
    long long seq;
    char prev[65];
    int full_now;     /* the last write failed for space */
    long long lost;   /* records accepted unwritten under disk_full=keep */
    double lost_since;
} lg = {.fd = -1, .can_allocate = 1};

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

/* The offset of the last '\n' before offset BEFORE into *AT (-1 when there is none). */
static int newline_before(int fd, off_t before, off_t *at) {
    static char buf[SCAN_CHUNK];
    *at = -1;
    while (before > 0) {
        off_t start = before > SCAN_CHUNK ? before - SCAN_CHUNK : 0;
        ssize_t n = pread(fd, buf, (size_t)(before - start), start);
        if (n != before - start)
            return n < 0 ? -errno : -EIO;
        for (ssize_t i = n - 1; i >= 0; i--) {
            if (buf[i] == '\n') {
                *at = start + i;
                return 0;
            }
        }
        before = start;
    }
    return 0;
}

/* The chain state (PREV, SEQ) after the last complete line of FD, whose size becomes *SIZE; a
 * torn tail is cut, its length in *TORN. */
static int load_tail(int fd, off_t *size, char prev[65], long long *seq, off_t *torn) {
    struct stat st;
    *torn = 0;
    memset(prev, '0', 64);
    prev[64] = '\0';
    *seq = 0;
    if (fstat(fd, &st) < 0)
        return -errno;
    *size = st.st_size;
    if (st.st_size == 0)
        return 0;
    off_t last_nl, start;
    int r = newline_before(fd, st.st_size, &last_nl);
    if (r < 0)
        return r;
    off_t end = last_nl + 1; /* the end of the last complete line */
    if (end < st.st_size) {
        *torn = st.st_size - end;
        if (ftruncate(fd, end) < 0)
            return -errno;
        *size = end;
    }
    if (end == 0)
        return 0;
    if ((r = newline_before(fd, last_nl, &start)) < 0)
        return r;
    start++;
    size_t len = (size_t)(last_nl - start);
    char *line = malloc(len + 1);
    if (!line)
        return -ENOMEM;
    ssize_t n = pread(fd, line, len, start);
    if (n != (ssize_t)len) {
        free(line);
        return n < 0 ? -errno : -EIO;
    }
    sh_sha256_hex(line, len, prev);
    json_t *last = json_loadb(line, len, 0, NULL);
    *seq = json_integer_value(json_object_get(last, "seq"));
    json_decref(last);
    free(line);
    return 0;
}

/* Keep UPTO bytes allocated (the reserve lies past the end of the file). -ENOSPC when the disk
 * cannot give them. */
static int ensure_allocated(off_t upto) {
    if (!lg.can_allocate || upto <= lg.alloc_end)
        return 0;
    off_t ahead = upto + ALLOC_CHUNK;
    if (fallocate(lg.fd, FALLOC_FL_KEEP_SIZE, lg.size, ahead - lg.size) == 0) {
        lg.alloc_end = ahead;
        return 0;
    }
    if (errno == EOPNOTSUPP || errno == ENOSYS) {
        lg.can_allocate = 0; /* no reserve on this filesystem: the marker may not fit */
        return 0;
    }
    if (errno != ENOSPC && errno != EDQUOT && errno != EFBIG)
        return -errno;
    if (fallocate(lg.fd, FALLOC_FL_KEEP_SIZE, lg.size, upto - lg.size) == 0) {
        lg.alloc_end = upto;
        return 0;
    }
    return -ENOSPC;
}

static int open_path(int *ret) {
    int r = mkdirs(sh_opt.log_path, 0750);
    if (r < 0)
        return r;
    int fd = open(sh_opt.log_path, O_RDWR | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, sh_opt.log_mode);
    if (fd < 0)
        return -errno;
    /* A log created by someone else, or with looser bits, is made root's and private again. */
    if (fchown(fd, geteuid(), getegid()) < 0 || fchmod(fd, sh_opt.log_mode) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    *ret = fd;
    return 0;
}

int sh_chain_open(off_t *torn) {
    int fd, r = open_path(&fd);
    if (r < 0)
        return r;
    r = load_tail(fd, &lg.size, lg.prev, &lg.seq, torn);
    if (r < 0) {
        close(fd);
        return r;
    }
    lg.fd = fd;
    lg.alloc_end = lg.size;
    ensure_allocated(lg.size + SH_RESERVE); /* a full disk at start: the first write says so */
    return 0;
}

int sh_chain_reopen(void) {
    int fd, r = open_path(&fd);
    if (r < 0)
        return r;
    struct stat a, b;
    if (fstat(fd, &a) == 0 && fstat(lg.fd, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
        close(fd); /* not moved away: the same file goes on */
        return 0;
    }
    char old_prev[65], prev[65];
    long long old_seq = lg.seq, seq;
    off_t size, torn;
    memcpy(old_prev, lg.prev, sizeof old_prev);
    r = load_tail(fd, &size, prev, &seq, &torn);
    if (r < 0) {
        close(fd);
        return r;
    }
    close(lg.fd);
    lg.fd = fd;
    lg.size = lg.alloc_end = size;
    lg.can_allocate = 1;
    if (size > 0) { /* someone put a log there: its own chain goes on, the old one is named */
        memcpy(lg.prev, prev, sizeof prev);
        lg.seq = seq;
    }
    ensure_allocated(lg.size + SH_RESERVE);
    json_t *m = sh_chain_daemon_record("log_reopened");
    json_object_set_new(m, "previous", json_pack("{s:s,s:I}", "hash", old_prev, "seq", (json_int_t)old_seq));
    if (torn)
        json_object_set_new(m, "torn_tail_bytes", json_integer(torn));
    sh_chain_daemon(m);
    return 0;
}

/* Append one line (TEXT without newline) with a single write; a short write is cut away. */
static int append_line(const char *text, size_t len, int reserve) {
    if (sh_opt.max_bytes) {
        long long budget = sh_opt.max_bytes - (reserve ? QUOTA_RESERVE : 0);
        if ((long long)lg.size + (long long)len + 1 > budget)
            return -ENOSPC;
    }
    if (reserve) {
        int r = ensure_allocated(lg.size + (off_t)len + 1 + SH_RESERVE);
        if (r < 0)
            return r;
    }
    char *line = malloc(len + 1);
    if (!line)
        return -ENOMEM;
    memcpy(line, text, len);
    line[len] = '\n';
    ssize_t n = write(lg.fd, line, len + 1);
    int err = n < 0 ? errno : 0;
    free(line);
    if (n == (ssize_t)len + 1) {
        lg.size += n;
        if (lg.alloc_end < lg.size)
            lg.alloc_end = lg.size;
        sh_sha256_hex(text, len, lg.prev);
        return 0;
    }
    /* Never leave a torn line: the next line's "prev" would chain to bytes nobody can parse. */
    if (ftruncate(lg.fd, lg.size) < 0)
        sh_say("cannot cut a torn line at %lld bytes: %s", (long long)lg.size, strerror(errno));
    lg.alloc_end = lg.size; /* the truncation may have freed what lay past the end */
    return n < 0 ? -err : -ENOSPC;
}

int sh_chain_write(json_t *rec, int reserve) {
    json_object_set_new(rec, "seq", json_integer(lg.seq + 1));
    json_object_set_new(rec, "prev", json_string(lg.prev));
    char *text = json_dumps(rec, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(rec);
    if (!text)
        return -ENOMEM;
    size_t len = strlen(text);
    int r = append_line(text, len, reserve);
    if (r == 0) {
        lg.seq++;
#ifdef SH_HAVE_SYSTEMD
        if (sh_opt.journal)
            sd_journal_send("MESSAGE=%s", text, "SYSLOG_IDENTIFIER=safehookd", "SAFEHOOK_SEQ=%lld", lg.seq,
                            "SAFEHOOK_HASH=%s", lg.prev, NULL);
#endif
    }
    free(text);
    return r;
}

json_t *sh_chain_daemon_record(const char *event) {
    json_t *rec = json_object();
    json_object_set_new(rec, "event", json_string(event));
    json_object_set_new(rec, "time", json_real(sh_now()));
    json_object_set_new(rec, "pid", json_integer(getpid()));
    json_object_set_new(rec, "peer", json_pack("{s:i,s:i,s:i}", "uid", (int)geteuid(), "gid", (int)getegid(),
                                               "pid", (int)getpid()));
    return rec;
}

static int is_space_error(int r) { return r == -ENOSPC || r == -EFBIG || r == -EDQUOT; }

static void enter_full(int err) {
    if (lg.full_now)
        return;
    lg.full_now = 1;
    sh_say("cannot append to %s: %s; disk_full=%s: %s", sh_opt.log_path, strerror(-err),
           sh_opt.full == SH_FULL_STOP ? "stop" : "keep",
           sh_opt.full == SH_FULL_STOP ? "records are refused and enforced jobs stop"
                                       : "jobs continue, records are counted and a records_lost marker follows");
    json_t *m = sh_chain_daemon_record("disk_full");
    json_object_set_new(m, "action", json_string(sh_opt.full == SH_FULL_STOP ? "stop" : "keep"));
    json_object_set_new(m, "error", json_string(strerror(-err)));
    int r = sh_chain_write(m, 0);
    if (r < 0)
        sh_say("the disk_full marker itself could not be written: %s", strerror(-r));
}

/* Space again after records were lost: say how many, before the next record. */
static void mark_lost(void) {
    if (lg.lost == 0)
        return;
    json_t *m = sh_chain_daemon_record("records_lost");
    json_object_set_new(m, "records", json_integer(lg.lost));
    json_object_set_new(m, "since", json_real(lg.lost_since));
    if (sh_chain_write(m, 1) == 0) {
        sh_say("space again: %lld records were lost since %.0f", lg.lost, lg.lost_since);
        lg.lost = 0;
        lg.full_now = 0;
    }
}

char sh_chain_take(json_t *rec) {
    mark_lost();
    int r = sh_chain_write(rec, 1);
    if (r == 0) {
        lg.full_now = 0;
        return 'O';
    }
    if (!is_space_error(r))
        sh_say("cannot append to %s: %s", sh_opt.log_path, strerror(-r));
    enter_full(r);
    if (sh_opt.full == SH_FULL_KEEP) {
        if (lg.lost++ == 0)
            lg.lost_since = sh_now();
        return 'O';
    }
    return 'F';
}

void sh_chain_daemon(json_t *rec) {
    mark_lost();
    int r = sh_chain_write(rec, 1);
    if (r == 0)
        return;
    if (!is_space_error(r))
        sh_say("cannot append to %s: %s", sh_opt.log_path, strerror(-r));
    enter_full(r);
    if (lg.lost++ == 0)
        lg.lost_since = sh_now();
}

long long sh_chain_seq(void) { return lg.seq; }

long long sh_chain_lost(void) { return lg.lost; }

void sh_chain_close(void) {
    if (lg.fd >= 0) {
        /* what was allocated past the end goes back to the disk */
        if (ftruncate(lg.fd, lg.size) < 0)
            sh_say("cannot release the log's reserve: %s", strerror(errno));
        close(lg.fd);
    }
    lg.fd = -1;
}
