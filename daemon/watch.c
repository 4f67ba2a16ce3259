/* The root watcher (--watch): which processes run torch, and whether each is protected, from
 * kernel facts only.
 *
 * - The proc connector (netlink, root) reports every fork, exec, uid change and exit on the
 *   machine, in kernel order: the watcher keeps a table of processes and their lineage, so a
 *   Slurm task's descendants stay its own however deep they nest, whether they call setsid,
 *   are reparented to init or outlive the task.
 * - fanotify marks on the libtorch files (--torch) report each process that opens one; every
 *   process is also looked at on a backing-off schedule after each exec (0.3 s to 30 s), for a
 *   libtorch copied or renamed elsewhere (procfs.c knows it by build-id).
 * - A process that maps libtorch is protected when it maps the installed libsafehook and _core
 *   (device and inode) and sent an "activate" record before it mapped libtorch (the record's
 *   sender is the kernel's pid of a message, serve.c), or when it is a fork (no exec since) of
 *   a process that did: a DataLoader worker. Its verdict is a "watch_torch" record (problems
 *   listed), written to the log and journald by the daemon. The activation record's content
 *   (enforce, digest) can only flag a process, never clear one.
 * - Under Slurm, slurmstepd (root) marks each task's first process ("task_start") and says when
 *   the step ends ("step_end"): then the daemon writes one "watch_task" verdict per task with
 *   its torch processes, its processes that outlived the step, and its checked model files
 *   (artifact.c).
 * A restarted daemon reads the activations of the last 64 MB of its log back (each carries its
 * sender's start time, stamped by the daemon); other processes running before it started cannot
 * be judged: their verdict is "unverified". */
#include "shd.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/cn_proc.h>
#include <linux/connector.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 4096
#define GRACE 2.0       /* a process mapping torch without an activation yet: looked at again */
#define STEP_GRACE 1.0  /* after step_end, before the task verdicts */
#define TASK_TIMEOUT 300.0
#define RECORDS_PER_MINUTE 30 /* flagged watch_torch records per uid; more are counted */

enum { V_NONE, V_OK, V_FLAGGED, V_UNVERIFIED };

typedef struct proc {
    pid_t pid;
    unsigned long long start; /* clock ticks since boot: with the pid, the process */
    uid_t uid;
    pid_t ppid;
    int preexisting;  /* running before the daemon started */
    int daemon_child; /* a child of this daemon (artifact checks) or its descendant */
    long long job, step, task; /* Slurm marks (job < 0: none), from the task's lineage */
    long long act_seq;         /* its activation record (0: none) */
    double act_mono;
    int act_enforce;
    char act_digest[65];
    int refused;            /* it sent a refused or policy_refused record */
    pid_t inherit_from;     /* an activated process it was forked from, with no exec since */
    int torch, verdict;
    double torch_at, next_check;
    int checks;
    int exited;
    json_t *problems;
    struct proc *next;
} proc;

typedef struct task {
    long long job, step, task;
    pid_t root;
    int exit_status, ended, step_ended, written;
    double due;
    struct task *next;
} task;

typedef struct uidbudget {
    uid_t uid;
    double window;
    int written;
    long long suppressed;
    struct uidbudget *next;
} uidbudget;

static struct {
    proc *procs[BUCKETS];
    task *tasks;
    uidbudget *budgets;
    int cn_fd, fan_fd;
    long long lost_events;
    double lost_reported;
    double started;
} w = {.cn_fd = -1, .fan_fd = -1};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int sh_watch_uid_wanted(uid_t uid) {
    if (sh_opt.nwatch_uids == 0)
        return 1;
    for (int i = 0; i < sh_opt.nwatch_uids; i++)
        if (sh_opt.watch_uids[i] == (long long)uid)
            return 1;
    return 0;
}

/* ---- the process table ---- */

static proc *find(pid_t pid) {
    for (proc *p = w.procs[pid % BUCKETS]; p; p = p->next)
        if (p->pid == pid)
            return p;
    return NULL;
}

static void drop(proc *p) {
    proc **pp = &w.procs[p->pid % BUCKETS];
    while (*pp && *pp != p)
        pp = &(*pp)->next;
    if (*pp)
        *pp = p->next;
    json_decref(p->problems);
    free(p);
}

/* A fresh entry for PID (replacing an old one of a reused pid), its facts read from /proc. */
static proc *fresh(pid_t pid) {
    proc *old = find(pid);
    if (old)
        drop(old);
    proc *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->pid = pid;
    p->job = p->step = p->task = -1;
    p->uid = (uid_t)-1;
    if (sh_proc_stat(pid, &p->start, &p->ppid, &p->uid) < 0)
        p->exited = 1;
    p->next = w.procs[pid % BUCKETS];
    w.procs[pid % BUCKETS] = p;
    return p;
}

static proc *get(pid_t pid) {
    proc *p = find(pid);
    return p ? p : fresh(pid);
}

static void schedule(proc *p, double at) {
    if (!p->next_check || at < p->next_check)
        p->next_check = at;
}

/* ---- verdicts ---- */

static uidbudget *budget_of(uid_t uid) {
    for (uidbudget *b = w.budgets; b; b = b->next)
        if (b->uid == uid)
            return b;
    uidbudget *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->uid = uid;
    b->next = w.budgets;
    w.budgets = b;
    return b;
}

static void put_marks(json_t *rec, const proc *p) {
    if (p->job < 0)
        return;
    json_object_set_new(rec, "job", json_integer(p->job));
    json_object_set_new(rec, "job_step", json_integer(p->step));
    json_object_set_new(rec, "task", json_integer(p->task));
}

static const char *verdict_name(int v) {
    return v == V_OK ? "ok" : v == V_FLAGGED ? "flagged" : v == V_UNVERIFIED ? "unverified" : "pending";
}

static void write_verdict(proc *p, const sh_maps_facts *f) {
    if (p->verdict == V_OK && p->inherit_from && !p->act_seq)
        return; /* a fork of an activated process (a DataLoader worker): counted in its task */
    if (p->verdict != V_OK) {
        uidbudget *b = budget_of(p->uid);
        double now = sh_now();
        if (b && now - b->window >= 60) {
            if (b->suppressed) {
                json_t *m = sh_chain_daemon_record("watch_suppressed");
                json_object_set_new(m, "uid", json_integer(p->uid));
                json_object_set_new(m, "flagged_not_written", json_integer(b->suppressed));
                sh_chain_daemon(m);
            }
            b->window = now;
            b->written = 0;
            b->suppressed = 0;
        }
        if (b && b->written++ >= RECORDS_PER_MINUTE) {
            b->suppressed++;
            return;
        }
    }
    char exe[512];
    sh_proc_exe(p->pid, exe, sizeof exe);
    json_t *rec = sh_chain_daemon_record("watch_torch");
    json_object_set_new(rec, "verdict", json_string(verdict_name(p->verdict)));
    json_object_set_new(rec, "problems", json_incref(p->problems));
    json_object_set_new(rec, "process", json_pack("{s:i,s:i,s:I,s:i,s:s}", "pid", (int)p->pid, "uid", (int)p->uid,
                                                  "start", (json_int_t)p->start, "ppid", (int)p->ppid, "exe", exe));
    json_object_set_new(rec, "torch", json_string(f->torch_path));
    json_object_set_new(rec, "maps", json_pack("{s:b,s:b}", "libsafehook", f->lib, "core", f->core));
    json_object_set_new(rec, "activation", p->act_seq ? json_integer(p->act_seq) : json_null());
    if (p->inherit_from)
        json_object_set_new(rec, "forked_from", json_integer(p->inherit_from));
    put_marks(rec, p);
    sh_chain_daemon(rec);
    if (p->verdict == V_FLAGGED)
        sh_say("watch: pid %d (uid %d, %s) runs torch unprotected", (int)p->pid, (int)p->uid, exe);
}

/* Judge P, which maps libtorch (facts F). FORCE: decide now, no grace left. Returns 1 when
 * decided. */
static int judge(proc *p, const sh_maps_facts *f, int force) {
    json_t *pr = json_array();
    int covered = p->act_seq || p->inherit_from;
    if (p->preexisting && !covered) {
        json_array_append_new(pr, json_string("running before the daemon started: its activation cannot be known"));
        json_decref(p->problems);
        p->problems = pr;
        p->verdict = V_UNVERIFIED;
        return 1;
    }
    if (!f->lib)
        json_array_append_new(pr, json_string("the installed libsafehook is not mapped"));
    if (!f->core)
        json_array_append_new(pr, json_string("the installed safehook._core is not mapped"));
    if (!covered)
        json_array_append_new(pr, json_string("no activation record from this process before it mapped libtorch"));
    if (p->act_seq && !p->act_enforce)
        json_array_append_new(pr, json_string("its activation record says the policy is not enforced"));
    if (p->act_seq && sh_opt.digest && strcmp(p->act_digest, sh_opt.digest))
        json_array_append_new(pr, json_string("its activation record names another policy digest"));
    if (p->refused)
        json_array_append_new(pr, json_string("its policy was refused, and it runs torch"));
    if (json_array_size(pr) && !covered && f->core && !force && sh_now() - p->torch_at < GRACE) {
        json_decref(pr); /* an activation may be on its way: once more shortly */
        return 0;
    }
    json_decref(p->problems);
    p->problems = pr;
    p->verdict = json_array_size(pr) ? V_FLAGGED : V_OK;
    return 1;
}

static int wanted(const proc *p) {
    return !p->daemon_child && (p->job >= 0 || sh_watch_uid_wanted(p->uid));
}

static void check(proc *p, int force) {
    double now = sh_now();
    p->next_check = 0;
    if (p->exited || !wanted(p))
        return;
    unsigned long long start;
    uid_t uid;
    if (sh_proc_stat(p->pid, &start, NULL, &uid) < 0 || start != p->start) {
        p->exited = 1; /* gone (or the pid is another process's now: its own fork event made it) */
        return;
    }
    p->uid = uid;
    if (p->verdict != V_NONE)
        return;
    sh_maps_facts f;
    if (sh_proc_maps(p->pid, &f) < 0)
        return;
    if (!f.torch) {
        static const double backoff[] = {0.3, 1, 2, 4, 8, 15, 30};
        int i = p->checks < 7 ? p->checks : 6;
        p->checks++;
        p->next_check = now + backoff[i];
        return;
    }
    if (!p->torch) {
        p->torch = 1;
        p->torch_at = now;
    }
    if (!judge(p, &f, force)) {
        p->next_check = now + 0.5;
        return;
    }
    write_verdict(p, &f);
}

/* ---- Slurm tasks ---- */

static task *task_of(long long job, long long step, long long t, int create) {
    for (task *k = w.tasks; k; k = k->next)
        if (k->job == job && k->step == step && k->task == t)
            return k;
    if (!create)
        return NULL;
    task *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    *k = (task){.job = job, .step = step, .task = t, .next = w.tasks};
    w.tasks = k;
    return k;
}

static void task_verdict(task *k) {
    json_t *torch = json_array(), *survivors = json_array(), *artifacts = json_array();
    int flagged = 0, forked_ok = 0, unverified = 0;
    for (int b = 0; b < BUCKETS; b++) {
        for (proc *p = w.procs[b], *next; p; p = next) {
            next = p->next;
            if (p->job != k->job || p->step != k->step || p->task != k->task)
                continue;
            if (!p->exited && p->torch && p->verdict == V_NONE)
                check(p, 1);
            if (p->torch && p->verdict != V_NONE) {
                if (p->verdict == V_OK && p->inherit_from && !p->act_seq) {
                    forked_ok++;
                } else {
                    json_array_append_new(torch, json_pack("{s:i,s:s,s:O}", "pid", (int)p->pid, "verdict",
                                                           verdict_name(p->verdict), "problems", p->problems));
                    flagged |= p->verdict == V_FLAGGED;
                    unverified |= p->verdict == V_UNVERIFIED;
                }
            }
            unsigned long long start;
            if (!p->exited && sh_proc_stat(p->pid, &start, NULL, NULL) == 0 && start == p->start) {
                char exe[512];
                sh_proc_exe(p->pid, exe, sizeof exe);
                json_array_append_new(survivors, json_pack("{s:i,s:s,s:b}", "pid", (int)p->pid, "exe", exe, "torch",
                                                           p->torch));
                flagged = 1; /* it escaped the step's end: Slurm could not find it to stop it */
            } else if (p->verdict == V_NONE || p->exited) {
                drop(p);
            }
        }
    }
    sh_artifact_task_results(k->job, k->step, k->task, artifacts);
    for (size_t i = 0; i < json_array_size(artifacts); i++)
        flagged |= strcmp(json_string_value(json_object_get(json_array_get(artifacts, i), "verdict")), "ok") != 0;
    json_t *rec = sh_chain_daemon_record("watch_task");
    json_object_set_new(rec, "job", json_integer(k->job));
    json_object_set_new(rec, "job_step", json_integer(k->step));
    json_object_set_new(rec, "task", json_integer(k->task));
    json_object_set_new(rec, "task_pid", json_integer(k->root));
    json_object_set_new(rec, "exit_status", json_integer(k->exit_status));
    json_object_set_new(rec, "verdict", json_string(flagged ? "flagged" : unverified ? "unverified" : "ok"));
    json_object_set_new(rec, "torch_processes", torch);
    json_object_set_new(rec, "forked_children_ok", json_integer(forked_ok));
    json_object_set_new(rec, "outlived_the_step", survivors);
    json_object_set_new(rec, "artifacts", artifacts);
    sh_chain_daemon(rec);
    if (flagged)
        sh_say("watch: job %lld step %lld task %lld flagged", k->job, k->step, k->task);
    k->written = 1;
}

static long long int_field(json_t *rec, const char *k) {
    json_t *v = json_object_get(rec, k);
    return json_is_integer(v) ? json_integer_value(v) : -1;
}

void sh_watch_record(pid_t pid, uid_t uid, const char *event, json_t *rec, long long seq) {
    if (!sh_opt.watch)
        return;
    if (!strcmp(event, "activate")) {
        proc *p = get(pid);
        if (!p)
            return;
        p->act_seq = seq;
        p->act_mono = mono();
        p->act_enforce = json_is_true(json_object_get(rec, "enforce"));
        const char *dg = json_string_value(json_object_get(rec, "digest"));
        snprintf(p->act_digest, sizeof p->act_digest, "%s", dg ? dg : "");
        return;
    }
    if (!strcmp(event, "refused") || !strcmp(event, "policy_refused")) {
        proc *p = get(pid);
        if (p)
            p->refused = 1;
        return;
    }
    if (uid != 0)
        return; /* Slurm's marks: root's (slurmstepd) only */
    long long job = int_field(rec, "job"), step = int_field(rec, "job_step"), t = int_field(rec, "task");
    if (!strcmp(event, "task_start")) {
        pid_t root = (pid_t)int_field(rec, "task_pid");
        task *k = task_of(job, step, t, 1);
        proc *p = root > 0 ? get(root) : NULL;
        if (!k || !p)
            return;
        k->root = root;
        p->job = job;
        p->step = step;
        p->task = t;
        schedule(p, sh_now() + 0.3);
    } else if (!strcmp(event, "task_end")) {
        task *k = task_of(job, step, t, 1);
        if (k) {
            k->ended = 1;
            k->exit_status = (int)int_field(rec, "exit_status");
            if (!k->due)
                k->due = sh_now() + TASK_TIMEOUT;
        }
    } else if (!strcmp(event, "step_end")) {
        for (task *k = w.tasks; k; k = k->next)
            if (k->job == job && k->step == step && !k->written)
                k->due = sh_now() + STEP_GRACE;
    }
}

int sh_watch_job_of(pid_t pid, long long *job, long long *step, long long *t) {
    proc *p = find(pid);
    if (!p || p->job < 0)
        return 0;
    *job = p->job;
    *step = p->step;
    *t = p->task;
    return 1;
}

/* ---- the kernel's reports ---- */

static void on_connector(int fd, void *unused) {
    (void)unused;
    char buf[16384] __attribute__((aligned(NLMSG_ALIGNTO)));
    for (int round = 0; round < 64; round++) {
        ssize_t len = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (len < 0) {
            if (errno == ENOBUFS) { /* events were lost: the scan schedule still covers them */
                w.lost_events++;
                continue;
            }
            return;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type != NLMSG_DONE)
                continue;
            struct cn_msg *cn = NLMSG_DATA(h);
            if (cn->id.idx != CN_IDX_PROC || cn->id.val != CN_VAL_PROC)
                continue;
            struct proc_event evbuf = {0}, *ev = &evbuf; /* the payload is only 4-byte aligned */
            memcpy(&evbuf, cn->data, cn->len < sizeof evbuf ? cn->len : sizeof evbuf);
            double now = sh_now();
            switch (ev->what) {
            case PROC_EVENT_FORK: {
                if (ev->event_data.fork.child_pid != ev->event_data.fork.child_tgid)
                    break; /* a thread */
                proc *parent = get(ev->event_data.fork.parent_tgid);
                proc *c = fresh(ev->event_data.fork.child_tgid);
                if (!c)
                    break;
                c->ppid = ev->event_data.fork.parent_tgid;
                if (parent) {
                    if (c->uid == (uid_t)-1)
                        c->uid = parent->uid;
                    c->job = parent->job;
                    c->step = parent->step;
                    c->task = parent->task;
                    c->daemon_child = parent->daemon_child || parent->pid == getpid();
                    c->inherit_from = parent->act_seq ? parent->pid : parent->inherit_from;
                    c->preexisting = parent->preexisting && !parent->act_seq && !parent->inherit_from;
                }
                schedule(c, now + 1.0);
                break;
            }
            case PROC_EVENT_EXEC: {
                proc *p = get(ev->event_data.exec.process_tgid);
                if (!p)
                    break;
                double exec_at = ev->timestamp_ns / 1e9;
                if (p->act_mono < exec_at) { /* an activation before the exec was the old image's */
                    p->act_seq = 0;
                    p->act_mono = 0;
                }
                p->inherit_from = 0;
                p->preexisting = 0;
                p->torch = 0;
                p->verdict = V_NONE;
                p->checks = 0;
                json_decref(p->problems);
                p->problems = NULL;
                p->next_check = 0;
                schedule(p, now + 0.3);
                break;
            }
            case PROC_EVENT_UID: {
                proc *p = find(ev->event_data.id.process_tgid);
                if (p)
                    p->uid = ev->event_data.id.r.ruid;
                break;
            }
            case PROC_EVENT_EXIT: {
                if (ev->event_data.exit.process_pid != ev->event_data.exit.process_tgid)
                    break; /* a thread */
                pid_t pid = ev->event_data.exit.process_tgid;
                sh_artifact_writer_exited(pid);
                proc *p = find(pid);
                if (!p)
                    break;
                p->exited = 1;
                if (p->job < 0)
                    drop(p);
                break;
            }
            default: break;
            }
        }
    }
}

static int listen_connector(void) {
    int fd = socket(PF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_CONNECTOR);
    if (fd < 0)
        return -errno;
    struct sockaddr_nl a = {.nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC, .nl_pid = 0};
    int big = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    struct __attribute__((packed)) {
        struct nlmsghdr h;
        struct cn_msg c;
        enum proc_cn_mcast_op op;
    } m = {0};
    m.h.nlmsg_len = sizeof m;
    m.h.nlmsg_type = NLMSG_DONE;
    m.h.nlmsg_pid = 0;
    m.c.id.idx = CN_IDX_PROC;
    m.c.id.val = CN_VAL_PROC;
    m.c.len = sizeof(enum proc_cn_mcast_op);
    m.op = PROC_CN_MCAST_LISTEN;
    if (send(fd, &m, sizeof m, 0) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

static void on_fanotify(int fd, void *unused) {
    (void)unused;
    char buf[8192] __attribute__((aligned(__alignof__(struct fanotify_event_metadata))));
    for (int round = 0; round < 16; round++) {
        ssize_t len = read(fd, buf, sizeof buf);
        if (len <= 0)
            return;
        for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, len); m = FAN_EVENT_NEXT(m, len)) {
            if (m->fd >= 0)
                close(m->fd);
            if (m->mask & FAN_Q_OVERFLOW) {
                w.lost_events++;
                continue;
            }
            proc *p = get(m->pid);
            if (p && !p->torch)
                schedule(p, sh_now() + 0.3); /* it opened libtorch: it maps it a moment later */
        }
    }
}

/* Activations in the log's last 64 MB whose sender (pid and start time, both the daemon's word)
 * still runs: a restarted daemon knows them again. */
static void read_back(void) {
    FILE *f = fopen(sh_opt.log_path, "re");
    if (!f)
        return;
    fseeko(f, 0, SEEK_END);
    off_t size = ftello(f), from = size > (64 << 20) ? size - (64 << 20) : 0;
    fseeko(f, from, SEEK_SET);
    char *line = NULL;
    size_t cap = 0;
    if (from)
        getline(&line, &cap, f); /* a partial first line */
    while (getline(&line, &cap, f) > 0) {
        if (!strstr(line, "\"activate\""))
            continue;
        json_t *r = json_loads(line, 0, NULL);
        json_t *peer = json_object_get(r, "peer");
        pid_t pid = (pid_t)json_integer_value(json_object_get(peer, "pid"));
        unsigned long long start = (unsigned long long)json_integer_value(json_object_get(peer, "start")), now;
        if (pid > 0 && start && !strcmp(json_string_value(json_object_get(r, "event")) ?: "", "activate") &&
            sh_proc_stat(pid, &now, NULL, NULL) == 0 && now == start) {
            proc *p = find(pid);
            if (p && p->start == start) {
                p->preexisting = 0;
                p->act_seq = json_integer_value(json_object_get(r, "seq"));
                p->act_enforce = json_is_true(json_object_get(r, "enforce"));
                const char *dg = json_string_value(json_object_get(r, "digest"));
                snprintf(p->act_digest, sizeof p->act_digest, "%s", dg ? dg : "");
            }
        }
        json_decref(r);
    }
    free(line);
    fclose(f);
}

static void scan_existing(void) {
    DIR *d = opendir("/proc");
    if (!d)
        return;
    struct dirent *e;
    double now = sh_now();
    int i = 0;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 1 || pid == getpid() || find((pid_t)pid))
            continue;
        proc *p = fresh((pid_t)pid);
        if (!p)
            continue;
        p->preexisting = 1;
        schedule(p, now + 0.2 + 0.01 * (i++ % 200)); /* spread over the first seconds */
    }
    closedir(d);
}

int sh_watch_start(void) {
    w.started = sh_now();
    sh_procfs_init();
    int r = listen_connector();
    if (r < 0) {
        sh_say("watch: the proc connector is not available (%s): lineage and exec events are unknown", strerror(-r));
    } else {
        w.cn_fd = r;
        sh_loop_add(w.cn_fd, on_connector, NULL);
    }
    if (sh_opt.ntorch) {
        w.fan_fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_CLOEXEC | O_LARGEFILE);
        if (w.fan_fd < 0)
            sh_say("watch: fanotify is not available (%s): torch is found by the scan alone", strerror(errno));
        for (int i = 0; w.fan_fd >= 0 && i < sh_opt.ntorch; i++)
            if (fanotify_mark(w.fan_fd, FAN_MARK_ADD, FAN_OPEN, AT_FDCWD, sh_opt.torch[i]) < 0)
                sh_say("watch: cannot mark %s: %s", sh_opt.torch[i], strerror(errno));
        if (w.fan_fd >= 0)
            sh_loop_add(w.fan_fd, on_fanotify, NULL);
    }
    scan_existing(); /* after listening: nothing falls between the scan and the events */
    read_back();
    if ((r = sh_artifact_start(0)) < 0)
        sh_say("watch: model files are not checked: %s", strerror(-r));
    json_t *m = sh_chain_daemon_record("watch_start");
    json_object_set_new(m, "proc_connector", json_boolean(w.cn_fd >= 0));
    json_object_set_new(m, "fanotify", json_boolean(w.fan_fd >= 0));
    json_object_set_new(m, "torch_files", json_integer(sh_opt.ntorch));
    json_object_set_new(m, "lib_files", json_integer(sh_opt.nlib));
    json_object_set_new(m, "core_files", json_integer(sh_opt.ncore));
    sh_chain_daemon(m);
    return 0;
}

void sh_watch_tick(void) {
    double now = sh_now();
    for (int b = 0; b < BUCKETS; b++)
        for (proc *p = w.procs[b], *next; p; p = next) {
            next = p->next; /* check() never frees p */
            if (p->next_check && p->next_check <= now)
                check(p, 0);
            if (p->exited && p->job < 0)
                drop(p); /* its exit event was lost, or it exited before a look */
        }
    for (task *k = w.tasks; k; k = k->next)
        if (!k->written && k->due && now >= k->due &&
            (sh_artifact_task_pending(k->job, k->step, k->task) == 0 || now >= k->due + TASK_TIMEOUT))
            task_verdict(k);
    for (task **kk = &w.tasks; *kk;) { /* written verdicts are forgotten */
        if ((*kk)->written) {
            task *k = *kk;
            *kk = k->next;
            free(k);
        } else {
            kk = &(*kk)->next;
        }
    }
    if (w.lost_events && now - w.lost_reported >= 10) {
        json_t *m = sh_chain_daemon_record("watch_lost_events");
        json_object_set_new(m, "events", json_integer(w.lost_events));
        sh_chain_daemon(m);
        sh_say("watch: %lld kernel events lost (queues overflowed); the scan schedule covers the processes",
               w.lost_events);
        w.lost_events = 0;
        w.lost_reported = now;
    }
}
