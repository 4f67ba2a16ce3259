/* safehookd's socket server: one thread, one epoll loop, no call that can block on a client.
 *
 * Each seqpacket message is one record; the daemon answers one byte: 'O' taken, 'F' refused
 * for a full disk (disk_full=stop), 'E' not a record (not a JSON object, no valid event name,
 * too long), 'T' over its uid's rate, 'R' refused: an event only the daemon (or root) may write.
 *
 * Who sent a record is the kernel's word, never the record's: SO_PASSCRED on the listening
 * socket makes every message carry its sender's pid/uid/gid (SCM_CREDENTIALS), so a record
 * sent over an inherited or passed connection names its real sender. The daemon overwrites
 * "pid" and "peer" with them (a different claimed pid is kept as "claimed_pid").
 *
 * No user can wedge it:
 * - replies are sent without blocking; a client that leaves them unread is not read from, and
 *   is dropped after --stall seconds, with a record;
 * - per uid: at most --uid-conns connections (more are closed at once) and --uid-rate bytes/s
 *   of records (a token bucket; over it, 'T'); each refusal is counted, the first in a window
 *   written at once and the rest every 10 s as one "daemon_limit" record per uid;
 * - descriptors: the soft RLIMIT_NOFILE is raised to the hard one, clients are capped below
 *   it, and a reserve descriptor is closed to accept-and-close when accept() says EMFILE, so a
 *   full table never turns into a busy loop;
 * - descriptors passed in a record (SCM_RIGHTS) are closed at once. */
#include "sh_config.h"
#include "shd.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_RECORD 65536
#define REPORT_WINDOW 10.0
#define TICK 0.1

extern volatile sig_atomic_t sh_stop_requested, sh_reopen_requested;

enum { SLOT_LISTEN, SLOT_CLIENT, SLOT_OTHER };

typedef struct slot {
    int kind;
    int fd;
    int dead; /* removed during this batch of events: freed after it */
    sh_ready_fn fn;
    void *data;
    struct slot *next_dead;
} slot;

typedef struct uidacct {
    uid_t uid;
    int conns;
    double tokens, refilled;
    long long refused_conns, refused_records, refused_bytes, dropped, forged;
    double reported; /* when the last daemon_limit record of this uid was written */
    int pending;     /* counts not yet written */
    struct uidacct *next;
} uidacct;

typedef struct client {
    slot s;
    uid_t uid;
    gid_t gid;
    pid_t pid; /* the connecting process (SO_PEERCRED) */
    uidacct *a;
    char reply;   /* a reply the socket could not take yet */
    int waiting;  /* reply holds a byte */
    double stalled_since;
    struct client *prev_stalled, *next_stalled;
} client;

static struct {
    int ep;
    slot listen;
    slot *by_fd_other[1024]; /* loop fds of the watcher (few, small numbers) */
    slot *dead;              /* removed slots, freed once the batch that may name them is done */
    int reserve_fd;
    int nclients, max_clients;
    client *stalled;
    uidacct *accts[256];
    long long fd_exhausted, over_max;
    double fd_reported;
    double listen_paused_until;
} s = {.ep = -1, .reserve_fd = -1};

static uidacct *acct_of(uid_t uid) {
    uidacct **b = &s.accts[uid % 256];
    for (uidacct *a = *b; a; a = a->next)
        if (a->uid == uid)
            return a;
    uidacct *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->uid = uid;
    a->tokens = sh_opt.uid_burst;
    a->refilled = sh_now();
    a->reported = -1e9;
    a->next = *b;
    *b = a;
    return a;
}

static void write_report(uidacct *a, double now) {
    json_t *m = sh_chain_daemon_record("daemon_limit");
    json_object_set_new(m, "uid", json_integer(a->uid));
    json_object_set_new(m, "refused_connections", json_integer(a->refused_conns));
    json_object_set_new(m, "refused_records", json_integer(a->refused_records));
    json_object_set_new(m, "refused_bytes", json_integer(a->refused_bytes));
    json_object_set_new(m, "dropped_clients", json_integer(a->dropped));
    json_object_set_new(m, "refused_events", json_integer(a->forged));
    json_object_set_new(m, "since", json_real(a->reported > 0 ? a->reported : now));
    json_object_set_new(m, "limits", json_pack("{s:i,s:f,s:f}", "connections", sh_opt.uid_conns, "bytes_per_second",
                                               sh_opt.uid_rate, "stall_seconds", sh_opt.stall_seconds));
    sh_chain_daemon(m);
    a->refused_conns = a->refused_records = a->refused_bytes = a->dropped = a->forged = 0;
    a->reported = now;
    a->pending = 0;
}

/* A refusal was counted in A: written at once when it is the first in a window. */
static void note_refusal(uidacct *a) {
    double now = sh_now();
    a->pending = 1;
    if (now - a->reported >= REPORT_WINDOW)
        write_report(a, now);
}

/* Write the counts of every uid whose window is over (ALL: every count, at shutdown). */
static void flush_reports(double now, int all) {
    for (int i = 0; i < 256; i++)
        for (uidacct *a = s.accts[i]; a; a = a->next)
            if (a->pending && (all || now - a->reported >= REPORT_WINDOW))
                write_report(a, now);
    if ((s.fd_exhausted || s.over_max) && (all || now - s.fd_reported >= REPORT_WINDOW)) {
        json_t *m = sh_chain_daemon_record("daemon_fd_exhausted");
        json_object_set_new(m, "refused_connections", json_integer(s.fd_exhausted));
        json_object_set_new(m, "over_max_clients", json_integer(s.over_max));
        json_object_set_new(m, "max_clients", json_integer(s.max_clients));
        sh_chain_daemon(m);
        sh_say("%lld connections refused: descriptors exhausted or %d clients open", s.fd_exhausted + s.over_max,
               s.max_clients);
        s.fd_exhausted = s.over_max = 0;
        s.fd_reported = now;
    }
}

/* ---- the loop's registry ---- */

static int ep_set(int op, int fd, uint32_t events, void *ptr) {
    struct epoll_event ev = {.events = events, .data.ptr = ptr};
    return epoll_ctl(s.ep, op, fd, &ev) < 0 ? -errno : 0;
}

int sh_loop_add(int fd, sh_ready_fn on_ready, void *data) {
    if (fd < 0 || fd >= (int)(sizeof s.by_fd_other / sizeof *s.by_fd_other))
        return -EBADF;
    slot *o = calloc(1, sizeof *o);
    if (!o)
        return -ENOMEM;
    *o = (slot){.kind = SLOT_OTHER, .fd = fd, .fn = on_ready, .data = data};
    int r = ep_set(EPOLL_CTL_ADD, fd, EPOLLIN, o);
    if (r < 0) {
        free(o);
        return r;
    }
    s.by_fd_other[fd] = o;
    return 0;
}

void sh_loop_del(int fd) {
    if (fd < 0 || fd >= (int)(sizeof s.by_fd_other / sizeof *s.by_fd_other) || !s.by_fd_other[fd])
        return;
    epoll_ctl(s.ep, EPOLL_CTL_DEL, fd, NULL);
    slot *o = s.by_fd_other[fd];
    o->dead = 1;
    o->next_dead = s.dead;
    s.dead = o;
    s.by_fd_other[fd] = NULL;
}

/* ---- clients ---- */

static void unstall(client *c) {
    if (!c->waiting)
        return;
    if (c->prev_stalled)
        c->prev_stalled->next_stalled = c->next_stalled;
    else
        s.stalled = c->next_stalled;
    if (c->next_stalled)
        c->next_stalled->prev_stalled = c->prev_stalled;
    c->prev_stalled = c->next_stalled = NULL;
    c->waiting = 0;
}

static void close_client(client *c) {
    unstall(c);
    epoll_ctl(s.ep, EPOLL_CTL_DEL, c->s.fd, NULL);
    close(c->s.fd);
    if (c->a && c->a->conns > 0)
        c->a->conns--;
    s.nclients--;
    free(c);
}

/* Answer C without blocking; a socket that cannot take it holds the byte, and C is not read
 * from until it can. */
static void reply(client *c, char r) {
    ssize_t n = send(c->s.fd, &r, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == 1)
        return;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        close_client(c);
        return;
    }
    c->reply = r;
    c->waiting = 1;
    c->stalled_since = sh_now();
    c->next_stalled = s.stalled;
    if (s.stalled)
        s.stalled->prev_stalled = c;
    s.stalled = c;
    ep_set(EPOLL_CTL_MOD, c->s.fd, EPOLLOUT, c);
}

static void on_writable(client *c) {
    ssize_t n = send(c->s.fd, &c->reply, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == 1) {
        unstall(c);
        ep_set(EPOLL_CTL_MOD, c->s.fd, EPOLLIN, c);
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        close_client(c);
    }
}

static void drop_stalled(double now) {
    for (client *c = s.stalled, *next; c; c = next) {
        next = c->next_stalled;
        if (now - c->stalled_since < sh_opt.stall_seconds)
            continue;
        if (c->a) {
            c->a->dropped++;
            note_refusal(c->a);
        }
        close_client(c);
    }
}

/* Event names: lowercase identifiers. Those of the daemon, and the Slurm marks only root may
 * send, are compared without case, spaces or punctuation, so a lookalike is refused too. */
static int valid_event(const char *e) {
    size_t n = strlen(e);
    if (n == 0 || n > 64 || e[0] < 'a' || e[0] > 'z')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((e[i] >= 'a' && e[i] <= 'z') || (e[i] >= '0' && e[i] <= '9') || e[i] == '_'))
            return 0;
    return 1;
}

static void squash(const char *e, char *out, size_t cap) {
    size_t j = 0;
    for (; *e && j + 1 < cap; e++) {
        char ch = *e;
        if (ch >= 'A' && ch <= 'Z')
            ch = (char)(ch - 'A' + 'a');
        if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9'))
            out[j++] = ch;
    }
    out[j] = '\0';
}

static int reserved_event(const char *squashed) {
    static const char *const own[] = {"diskfull", "recordslost", "logreopened"};
    if (!strncmp(squashed, "daemon", 6) || !strncmp(squashed, "watch", 5))
        return 1;
    for (size_t i = 0; i < sizeof own / sizeof *own; i++)
        if (!strcmp(squashed, own[i]))
            return 1;
    return 0;
}

static int root_only_event(const char *squashed) {
    static const char *const marks[] = {"jobstart", "taskstart", "taskend", "stepend", "taskcheck"};
    for (size_t i = 0; i < sizeof marks / sizeof *marks; i++)
        if (!strcmp(squashed, marks[i]))
            return 1;
    return 0;
}

/* The reply byte for one record of C, sent by SENDER (the kernel's credentials). */
static char handle_record(client *c, const struct ucred *sender, const char *buf, size_t len) {
    json_error_t jerr;
    json_t *rec = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    const char *event = json_string_value(json_object_get(rec, "event"));
    if (!rec || !json_is_object(rec) || !event) {
        json_decref(rec);
        return 'E';
    }
    char sq[80];
    squash(event, sq, sizeof sq);
    if (reserved_event(sq) || (root_only_event(sq) && sender->uid != 0)) {
        uidacct *a = acct_of(sender->uid);
        if (a) {
            a->forged++;
            note_refusal(a);
        }
        json_decref(rec);
        return 'R';
    }
    if (!valid_event(event)) {
        json_decref(rec);
        return 'E';
    }
    json_t *claimed = json_object_get(rec, "pid");
    if (claimed && !(json_is_integer(claimed) && json_integer_value(claimed) == sender->pid))
        json_object_set(rec, "claimed_pid", claimed);
    json_object_set_new(rec, "pid", json_integer(sender->pid));
    json_t *peer = json_pack("{s:i,s:i,s:i}", "uid", (int)sender->uid, "gid", (int)sender->gid, "pid",
                             (int)sender->pid);
    if (c->pid != sender->pid) /* an inherited or passed connection: who connected, beside who sent */
        json_object_set_new(peer, "conn_pid", json_integer(c->pid));
    if (c->uid != sender->uid)
        json_object_set_new(peer, "conn_uid", json_integer(c->uid));
    unsigned long long start;
    if (sh_opt.watch && !strcmp(event, "activate") && sh_proc_stat(sender->pid, &start, NULL, NULL) == 0)
        json_object_set_new(peer, "start", json_integer((json_int_t)start)); /* a restarted daemon knows it again */
    json_object_set_new(rec, "peer", peer);
    char ev[80];
    snprintf(ev, sizeof ev, "%s", event);
    long long seq = sh_chain_seq() + 1;
    json_incref(rec);
    char r = sh_chain_take(rec);
    if (r == 'O')
        sh_watch_record(sender->pid, sender->uid, ev, rec, seq);
    json_decref(rec);
    return r;
}

static void on_readable(client *c) {
    static char buf[MAX_RECORD + 1];
    union {
        char b[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(8 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    ssize_t len = recvmsg(c->s.fd, &mh, MSG_TRUNC | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (len <= 0) {
        close_client(c);
        return;
    }
    struct ucred sender = {.pid = c->pid, .uid = c->uid, .gid = c->gid};
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET)
            continue;
        if (cm->cmsg_type == SCM_CREDENTIALS && cm->cmsg_len >= CMSG_LEN(sizeof sender)) {
            memcpy(&sender, CMSG_DATA(cm), sizeof sender);
        } else if (cm->cmsg_type == SCM_RIGHTS) { /* descriptors are not records: closed */
            size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                close(fd);
            }
        }
    }
    if (len > MAX_RECORD) {
        reply(c, 'E');
        return;
    }
    if (sender.uid != 0) {
        uidacct *a = sender.uid == c->uid ? c->a : acct_of(sender.uid);
        if (a) {
            double now = sh_now();
            a->tokens += (now - a->refilled) * sh_opt.uid_rate;
            if (a->tokens > sh_opt.uid_burst)
                a->tokens = sh_opt.uid_burst;
            a->refilled = now;
            if (a->tokens < (double)len) {
                a->refused_records++;
                a->refused_bytes += len;
                note_refusal(a);
                reply(c, 'T');
                return;
            }
            a->tokens -= (double)len;
        }
    }
    reply(c, handle_record(c, &sender, buf, (size_t)len));
}

/* accept() said EMFILE/ENFILE: take the connection with the reserve descriptor and close it, so
 * that it leaves the backlog instead of waking the loop forever. */
static void shed(void) {
    if (s.reserve_fd >= 0) {
        close(s.reserve_fd);
        s.reserve_fd = -1;
    }
    int fd = accept4(s.listen.fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0)
        close(fd);
    s.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s.fd_exhausted++;
}

static void on_listen(void) {
    for (int i = 0; i < 64; i++) {
        int fd = accept4(s.listen.fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {
                shed();
                continue;
            }
            sh_say("accept: %s", strerror(errno));
            s.listen_paused_until = sh_now() + 0.1; /* ENOMEM, ENOBUFS: no busy loop */
            ep_set(EPOLL_CTL_MOD, s.listen.fd, 0, &s.listen);
            return;
        }
        struct ucred uc;
        socklen_t ul = sizeof uc;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &ul) < 0) {
            close(fd);
            continue;
        }
        uidacct *a = acct_of(uc.uid);
        if (uc.uid != 0 && a && a->conns >= sh_opt.uid_conns) {
            close(fd);
            a->refused_conns++;
            note_refusal(a);
            continue;
        }
        if (s.nclients >= s.max_clients) {
            close(fd);
            s.over_max++;
            continue;
        }
        client *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        *c = (client){.s = {.kind = SLOT_CLIENT, .fd = fd}, .uid = uc.uid, .gid = uc.gid, .pid = uc.pid, .a = a};
        if (ep_set(EPOLL_CTL_ADD, fd, EPOLLIN, c) < 0) {
            close(fd);
            free(c);
            continue;
        }
        if (a)
            a->conns++;
        s.nclients++;
    }
}

int sh_open_socket(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sh_opt.socket_path) >= sizeof addr.sun_path)
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, sh_opt.socket_path);
    char dir[sizeof addr.sun_path];
    snprintf(dir, sizeof dir, "%s", sh_opt.socket_path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = '\0';
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
            return -errno;
    }
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    /* on the listening socket: every message, even one queued before accept, has credentials */
    if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    unlink(sh_opt.socket_path);
    /* Every user's job connects; the kernel's credentials, not the socket's mode, say who. */
    mode_t old = umask(0);
    int r = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (r < 0 || chmod(sh_opt.socket_path, 0666) < 0 || listen(fd, 4096) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

/* As many descriptors as the hard limit allows; clients are capped below, leaving room for the
 * log, the watcher and the artifact checks. */
static void size_limits(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    long n = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (long)rl.rlim_cur : 1024;
    if (n > 1 << 20)
        n = 1 << 20;
    s.max_clients = n > 256 ? (int)(n - 128) : (int)(n / 2);
    if (sh_opt.max_clients > 0)
        s.max_clients = sh_opt.max_clients; /* tests: more than descriptors, to reach EMFILE */
}

int sh_serve(int lfd) {
    size_limits();
    s.ep = epoll_create1(EPOLL_CLOEXEC);
    if (s.ep < 0)
        return -errno;
    s.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s.listen = (slot){.kind = SLOT_LISTEN, .fd = lfd};
    int r = ep_set(EPOLL_CTL_ADD, lfd, EPOLLIN, &s.listen);
    if (r < 0)
        return r;
    if (sh_opt.watch && (r = sh_watch_start()) < 0)
        return r;
    struct epoll_event evs[256];
    double next_tick = sh_now() + TICK;
    while (!sh_stop_requested) {
        if (sh_reopen_requested) {
            sh_reopen_requested = 0;
            r = sh_chain_reopen();
            if (r < 0)
                sh_say("cannot reopen %s: %s", sh_opt.log_path, strerror(-r));
            if (sh_opt.watch)
                sh_procfs_refresh();
        }
        double now = sh_now();
        int timeout = next_tick > now ? (int)((next_tick - now) * 1000) + 1 : 0;
        int n = epoll_wait(s.ep, evs, sizeof evs / sizeof *evs, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (int i = 0; i < n; i++) {
            slot *sl = evs[i].data.ptr;
            if (sl->kind == SLOT_LISTEN) {
                on_listen();
            } else if (sl->kind == SLOT_OTHER) {
                if (!sl->dead)
                    sl->fn(sl->fd, sl->data);
            } else {
                client *c = (client *)sl;
                if (c->waiting)
                    on_writable(c);
                else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                    on_readable(c);
            }
        }
        while (s.dead) {
            slot *o = s.dead;
            s.dead = o->next_dead;
            free(o);
        }
        now = sh_now();
        if (now >= next_tick) {
            next_tick = now + TICK;
            drop_stalled(now);
            flush_reports(now, 0);
            if (s.listen_paused_until && now >= s.listen_paused_until) {
                s.listen_paused_until = 0;
                ep_set(EPOLL_CTL_MOD, s.listen.fd, EPOLLIN, &s.listen);
            }
            if (sh_opt.watch) {
                sh_watch_tick();
                sh_artifact_tick();
            }
        }
    }
    flush_reports(sh_now(), 1);
    return 0;
}
