/* The model files a job writes, checked by root (--watch with --watch-fs).
 *
 * Which files: fanotify reports every close-after-write on the filesystems of --watch-fs (a
 * filesystem mark: every mount of it, bind mounts and other mount namespaces included), with
 * the writer's pid. A file is a model file by its first bytes, not its name: a safetensors
 * header, a zip (torch.save), a pickle. Chosen over a declared output folder because the job
 * cannot choose where root looks: a checkpoint written anywhere on a watched filesystem, under
 * any name, is seen. The daemon keeps the file open, so a rename before the check is followed.
 *
 * When: once its writer has exited, or after --artifact-quiet seconds without a new write (a
 * long job's periodic checkpoints); a Slurm task's verdict waits for its files.
 *
 * How: `safehook verify --base BASE --checkpoint FILE --policy POLICY` (the site's base model and
 * policy: --verify-base, --verify-policy), run by the daemon, two at a time, each in its own
 * process whose exit status is the verdict (0 ok, 1 frozen tensors changed, else error). A
 * folder with a shard index is checked as one checkpoint. The verdict is a "watch_artifact"
 * record with the writer (kernel pid, uid, Slurm marks). */
#include "shd.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PENDING 1024
#define PER_UID_PENDING 64
#define RUNNING_AT_ONCE 2
#define CHECK_TIMEOUT 600.0

enum { A_PENDING, A_RUNNING, A_DONE };

typedef struct art {
    int fd; /* the file, kept open until checked */
    dev_t dev;
    ino_t ino;
    char kind[16];
    pid_t writer;
    uid_t uid;
    long long job, step, task;
    int writer_gone;
    double last_write;
    int state;
    pid_t child;
    int pidfd, out_fd;
    double started;
    char out[2048];
    size_t outlen;
    char target[4096];
    int exit_code;
    const char *verdict;
    struct art *next;
} art;

static struct {
    int fan_fd;
    art *list;
    int npending, nrunning;
    long long overflow;
    double overflow_reported;
} a = {.fan_fd = -1};

/* What kind of model file the first bytes HEAD (N of them) of a file of SIZE bytes say. */
static const char *model_kind(const unsigned char *h, size_t n, off_t size) {
    if (n >= 9) {
        unsigned long long hl = 0;
        for (int i = 7; i >= 0; i--)
            hl = (hl << 8) | h[i];
        if (h[8] == '{' && hl > 1 && (off_t)(hl + 8) <= size)
            return "safetensors";
    }
    if (n >= 4 && h[0] == 'P' && h[1] == 'K' && h[2] == 3 && h[3] == 4)
        return "zip";
    if (n >= 2 && h[0] == 0x80 && h[1] >= 2 && h[1] <= 5)
        return "pickle";
    return NULL;
}

static int count_uid(uid_t uid) {
    int n = 0;
    for (art *x = a.list; x; x = x->next)
        n += x->uid == uid && x->state != A_DONE;
    return n;
}

static void on_close_write(int fd, void *unused) {
    (void)unused;
    char buf[8192] __attribute__((aligned(__alignof__(struct fanotify_event_metadata))));
    for (int round = 0; round < 16; round++) {
        ssize_t len = read(fd, buf, sizeof buf);
        if (len <= 0)
            return;
        for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, len); m = FAN_EVENT_NEXT(m, len)) {
            if (m->mask & FAN_Q_OVERFLOW) {
                a.overflow++;
                continue;
            }
            if (m->fd < 0)
                continue;
            int keep = 0;
            struct stat st;
            unsigned char head[16];
            const char *kind = NULL;
            ssize_t hn;
            if (fstat(m->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= 16 &&
                (hn = pread(m->fd, head, sizeof head, 0)) > 0)
                kind = model_kind(head, (size_t)hn, st.st_size);
            long long job = -1, step = -1, t = -1;
            uid_t uid = st.st_uid;
            if (kind) {
                int marked = sh_watch_job_of(m->pid, &job, &step, &t);
                unsigned long long start;
                sh_proc_stat(m->pid, &start, NULL, &uid);
                if (m->pid == getpid() || (!marked && (uid == 0 || !sh_watch_uid_wanted(uid))))
                    kind = NULL; /* root's own files outside jobs; uids not watched */
            }
            art *x = NULL;
            for (art *y = a.list; kind && y && !x; y = y->next)
                if (y->dev == st.st_dev && y->ino == st.st_ino && y->state != A_RUNNING)
                    x = y;
            if (kind && !x) {
                if (a.npending >= MAX_PENDING || count_uid(uid) >= PER_UID_PENDING) {
                    a.overflow++;
                } else if ((x = calloc(1, sizeof *x))) {
                    x->fd = m->fd;
                    keep = 1;
                    x->dev = st.st_dev;
                    x->ino = st.st_ino;
                    x->next = a.list;
                    a.list = x;
                    a.npending++;
                }
            } else if (x && x->state == A_DONE) {
                a.npending++; /* written again: checked again */
                x->fd = m->fd;
                keep = 1;
            }
            if (x) {
                snprintf(x->kind, sizeof x->kind, "%s", kind);
                x->writer = m->pid;
                x->uid = uid;
                x->job = job;
                x->step = step;
                x->task = t;
                x->writer_gone = 0;
                x->last_write = sh_now();
                x->state = A_PENDING;
                x->verdict = NULL;
            }
            if (!keep)
                close(m->fd);
        }
    }
}

/* The checkpoint FILE belongs to: its folder when that holds a shard index, else itself. */
static void target_of(art *x) {
    char p[64], path[4096];
    snprintf(p, sizeof p, "/proc/self/fd/%d", x->fd);
    ssize_t n = readlink(p, path, sizeof path - 1);
    path[n > 0 ? n : 0] = '\0';
    snprintf(x->target, sizeof x->target, "%s", path);
    char *slash = strrchr(path, '/');
    if (!slash)
        return;
    *slash = '\0';
    static const char *const index[] = {"model.safetensors.index.json", "pytorch_model.bin.index.json"};
    for (int i = 0; i < 2; i++) {
        char ip[4200];
        snprintf(ip, sizeof ip, "%s/%s", path, index[i]);
        if (access(ip, F_OK) == 0) {
            snprintf(x->target, sizeof x->target, "%s", path);
            return;
        }
    }
}

static void finish(art *x, int code, const char *verdict) {
    x->exit_code = code;
    x->verdict = verdict;
    x->state = A_DONE;
    a.npending--;
    json_t *rec = sh_chain_daemon_record("watch_artifact");
    json_object_set_new(rec, "path", json_string(x->target));
    json_object_set_new(rec, "kind", json_string(x->kind));
    json_object_set_new(rec, "file", json_pack("{s:I,s:I}", "dev", (json_int_t)x->dev, "ino", (json_int_t)x->ino));
    json_object_set_new(rec, "writer", json_pack("{s:i,s:i}", "pid", (int)x->writer, "uid", (int)x->uid));
    if (x->job >= 0) {
        json_object_set_new(rec, "job", json_integer(x->job));
        json_object_set_new(rec, "job_step", json_integer(x->step));
        json_object_set_new(rec, "task", json_integer(x->task));
    }
    json_object_set_new(rec, "verdict", json_string(verdict));
    json_object_set_new(rec, "exit_code", json_integer(code));
    x->out[x->outlen] = '\0';
    json_object_set_new(rec, "output", json_string(x->out));
    if (!json_object_get(rec, "output")) /* not UTF-8 */
        json_object_set_new(rec, "output", json_string("(not UTF-8)"));
    sh_chain_daemon(rec);
    if (strcmp(verdict, "ok"))
        sh_say("watch: %s written by pid %d (uid %d): %s", x->target, (int)x->writer, (int)x->uid, verdict);
    if (x->fd >= 0)
        close(x->fd);
    x->fd = -1;
}

static void on_output(int fd, void *data) {
    art *x = data;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) {
        sh_loop_del(fd);
        close(fd);
        x->out_fd = -1;
        return;
    }
    size_t keep = sizeof x->out - 1; /* more than one read: buf always fits */
    if (x->outlen + (size_t)n > keep) { /* keep the last bytes: the summary ends the output */
        size_t drop = x->outlen + (size_t)n - keep;
        memmove(x->out, x->out + drop, x->outlen - drop);
        x->outlen -= drop;
    }
    memcpy(x->out + x->outlen, buf, (size_t)n);
    x->outlen += (size_t)n;
}

static void on_exit_child(int fd, void *data) {
    art *x = data;
    int status;
    if (waitpid(x->child, &status, WNOHANG) != x->child)
        return;
    sh_loop_del(fd);
    close(fd);
    if (x->out_fd >= 0) { /* what is left of its output */
        on_output(x->out_fd, x);
        if (x->out_fd >= 0) {
            sh_loop_del(x->out_fd);
            close(x->out_fd);
            x->out_fd = -1;
        }
    }
    a.nrunning--;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    finish(x, code, code == 0 ? "ok" : code == 1 ? "changed" : "error");
}

static void run(art *x) {
    target_of(x);
    if (strstr(x->target, " (deleted)")) {
        finish(x, -1, "deleted before it could be checked");
        return;
    }
    if (!sh_opt.verify_base) {
        finish(x, -1, "unchecked: no --verify-base");
        return;
    }
    int out[2];
    if (pipe2(out, O_CLOEXEC) < 0)
        return;
    pid_t pid = fork();
    if (pid < 0) {
        close(out[0]);
        close(out[1]);
        return;
    }
    if (pid == 0) {
        dup2(out[1], 1);
        dup2(out[1], 2);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "%s", sh_opt.verify_cmd);
        char *argv[32];
        int n = 0;
        for (char *tok = strtok(cmd, " "); tok && n < 20; tok = strtok(NULL, " "))
            argv[n++] = tok;
        argv[n++] = "verify";
        argv[n++] = "--base";
        argv[n++] = (char *)sh_opt.verify_base;
        argv[n++] = "--checkpoint";
        argv[n++] = x->target;
        if (sh_opt.verify_policy) {
            argv[n++] = "--policy";
            argv[n++] = (char *)sh_opt.verify_policy;
        }
        argv[n] = NULL;
        execvp(argv[0], argv);
        _exit(127);
    }
    close(out[1]);
    x->child = pid;
    x->out_fd = out[0];
    x->outlen = 0;
    x->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    x->state = A_RUNNING;
    x->started = sh_now();
    a.nrunning++;
    fcntl(x->out_fd, F_SETFL, O_NONBLOCK);
    sh_loop_add(x->out_fd, on_output, x);
    if (x->pidfd >= 0)
        sh_loop_add(x->pidfd, on_exit_child, x);
}

int sh_artifact_start(int unused) {
    (void)unused;
    if (!sh_opt.nwatch_fs)
        return 0;
    a.fan_fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_CLOEXEC | O_LARGEFILE);
    if (a.fan_fd < 0)
        return -errno;
    for (int i = 0; i < sh_opt.nwatch_fs; i++)
        if (fanotify_mark(a.fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_CLOSE_WRITE, AT_FDCWD, sh_opt.watch_fs[i]) <
            0)
            sh_say("watch: cannot watch the filesystem of %s: %s", sh_opt.watch_fs[i], strerror(errno));
    return sh_loop_add(a.fan_fd, on_close_write, NULL);
}

void sh_artifact_writer_exited(pid_t pid) {
    for (art *x = a.list; x; x = x->next)
        if (x->writer == pid && x->state == A_PENDING)
            x->writer_gone = 1;
}

void sh_artifact_tick(void) {
    double now = sh_now();
    for (art *x = a.list; x && a.nrunning < RUNNING_AT_ONCE; x = x->next)
        if (x->state == A_PENDING && (x->writer_gone || now - x->last_write >= sh_opt.artifact_quiet))
            run(x);
    for (art *x = a.list; x; x = x->next)
        if (x->state == A_RUNNING && now - x->started > CHECK_TIMEOUT)
            kill(x->child, SIGKILL); /* its exit is collected as usual: "error" */
    /* forget checked files of no Slurm task after a minute; task files go with the verdict */
    for (art **xx = &a.list; *xx;) {
        art *x = *xx;
        if (x->state == A_DONE && x->job < 0 && now - x->last_write > 60) {
            *xx = x->next;
            free(x);
        } else {
            xx = &x->next;
        }
    }
    if (a.overflow && now - a.overflow_reported >= 60) {
        json_t *m = sh_chain_daemon_record("watch_artifact_overflow");
        json_object_set_new(m, "files_not_checked", json_integer(a.overflow));
        sh_chain_daemon(m);
        a.overflow = 0;
        a.overflow_reported = now;
    }
}

int sh_artifact_task_pending(long long job, long long step, long long task) {
    int n = 0;
    for (art *x = a.list; x; x = x->next)
        if (x->job == job && x->step == step && x->task == task && x->state != A_DONE) {
            x->writer_gone = 1; /* the task is over: check it now */
            n++;
        }
    return n;
}

void sh_artifact_task_results(long long job, long long step, long long task, json_t *arr) {
    for (art **xx = &a.list; *xx;) {
        art *x = *xx;
        if (x->job == job && x->step == step && x->task == task && x->state == A_DONE) {
            json_array_append_new(arr, json_pack("{s:s,s:s,s:i}", "path", x->target, "verdict", x->verdict,
                                                 "exit_code", x->exit_code));
            *xx = x->next;
            free(x);
        } else {
            xx = &x->next;
        }
    }
}
