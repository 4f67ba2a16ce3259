/* safehook_spank.so: Slurm SPANK plugin that deploys safehook on every task of every job and
 * checks, out of process, that every task which imported torch was protected.
 *
 * plugstack.conf:
 *   required /usr/lib/.../safehook_spank.so lib=/path/libsafehook.so [socket=/run/safehook/audit.sock]
 *            [log=/var/log/safehook/audit.jsonl] [digest=HEX] [policy=/path/user-policy.json]
 *
 * In slurmstepd (root), per step:
 *   user_init       sends a "job_start" record to safehookd (job, step, uid) and starts a watcher
 *                   thread that scans, every 100 ms, the processes descended from the step's tasks
 *                   and notes those that map libtorch (imported torch, whatever their environment);
 *   task_init       (in the task, before exec) puts lib in LD_PRELOAD (and policy in SAFEHOOK_POLICY);
 *   task_post_fork  adds the task's pid to the watch;
 *   task_exit       reads safehookd's log from the step's start and, for every torch process of the
 *                   task, looks for its "start" record (enforce true, from the system policy, with
 *                   the expected digest when digest= is given) and its "end" record; it sends one
 *                   "task_check" record per task (verdict "ok" or "flagged", with what is missing
 *                   per pid), and logs a flagged task in slurmd's log.
 * `srun env -i python train.py` drops LD_PRELOAD: the process still maps libtorch, has no start
 * record, and is flagged. Limits: a process that imports torch and exits within one scan period
 * (100 ms) can be missed; records are matched by the pid safehookd stamps from SO_PEERCRED, so a
 * PID namespace inside the task (unshare -p) hides the match and flags the task. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <slurm/spank.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "audit_sink.h"
#include "sh_config.h"

SPANK_PLUGIN(safehook, 1);

#define MAX_TASKS 256
#define MAX_PIDS 4096

static struct {
    char lib[1024], socket[1024], log[1024], digest[65], policy[1024];
    uint32_t job, step;
    uid_t uid;
    off_t log_start;
    pthread_t thread;
    int running;
    pthread_mutex_t mu;
    pid_t task_pid[MAX_TASKS];
    uint32_t task_id[MAX_TASKS];
    int ntasks;
    pid_t torch_pid[MAX_PIDS];
    int torch_task[MAX_PIDS]; /* index into task_pid */
    int ntorch;
} g = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void copy_arg(char *dst, size_t n, const char *v) { snprintf(dst, n, "%s", v); }

static int parse_args(int ac, char **av) {
    copy_arg(g.socket, sizeof g.socket, SH_AUDIT_SOCKET);
    copy_arg(g.log, sizeof g.log, SH_AUDIT_LOG);
    for (int i = 0; i < ac; i++) {
        const char *a = av[i];
        if (!strncmp(a, "lib=", 4))
            copy_arg(g.lib, sizeof g.lib, a + 4);
        else if (!strncmp(a, "socket=", 7))
            copy_arg(g.socket, sizeof g.socket, a + 7);
        else if (!strncmp(a, "log=", 4))
            copy_arg(g.log, sizeof g.log, a + 4);
        else if (!strncmp(a, "digest=", 7))
            copy_arg(g.digest, sizeof g.digest, a + 7);
        else if (!strncmp(a, "policy=", 7))
            copy_arg(g.policy, sizeof g.policy, a + 7);
        else {
            slurm_error("safehook: unknown plugin argument %s", a);
            return -1;
        }
    }
    if (!g.lib[0]) {
        slurm_error("safehook: plugstack.conf must give lib=/path/libsafehook.so");
        return -1;
    }
    return 0;
}

/* Send one record to safehookd (a fresh connection: slurmstepd is long-lived and forks). */
static int send_record(json_t *rec) {
    int fd = sh_audit_sink_connect(g.socket);
    if (fd < 0) {
        json_decref(rec);
        return fd;
    }
    char *text = json_dumps(rec, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(rec);
    int r = text ? sh_audit_sink_send(fd, text, strlen(text)) : -ENOMEM;
    free(text);
    close(fd);
    return r;
}

static json_t *record(const char *event) {
    return json_pack("{s:s,s:i,s:I,s:I,s:I}", "event", event, "pid", (int)getpid(), "job", (json_int_t)g.job,
                     "job_step", (json_int_t)g.step, "uid", (json_int_t)g.uid);
}

/* ---- the watcher: processes of the step that map libtorch ---- */

static pid_t parent_of(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    int ppid;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1)
        return -1;
    return ppid;
}

static int maps_torch(pid_t pid) {
    char path[64], line[4096];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    int hit = 0;
    while (!hit && fgets(line, sizeof line, f))
        hit = strstr(line, "/libtorch_cpu.so") || strstr(line, "/libtorch_python.so") || strstr(line, "/libtorch.so");
    fclose(f);
    return hit;
}

/* The task (index) PID descends from, or -1. Walks up to 64 parents. */
static int task_of(pid_t pid) {
    for (int depth = 0; pid > 1 && depth < 64; depth++) {
        for (int i = 0; i < g.ntasks; i++)
            if (g.task_pid[i] == pid)
                return i;
        pid = parent_of(pid);
    }
    return -1;
}

static void scan(void) {
    DIR *d = opendir("/proc");
    if (!d)
        return;
    struct dirent *e;
    pthread_mutex_lock(&g.mu);
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 1 || pid == getpid())
            continue;
        int known = 0;
        for (int i = 0; i < g.ntorch && !known; i++)
            known = g.torch_pid[i] == pid;
        if (known)
            continue;
        int t = task_of((pid_t)pid);
        if (t >= 0 && g.ntorch < MAX_PIDS && maps_torch((pid_t)pid)) {
            g.torch_pid[g.ntorch] = (pid_t)pid;
            g.torch_task[g.ntorch++] = t;
        }
    }
    pthread_mutex_unlock(&g.mu);
    closedir(d);
}

static void *watch(void *unused) {
    (void)unused;
    while (__atomic_load_n(&g.running, __ATOMIC_ACQUIRE)) {
        scan();
        usleep(100 * 1000);
    }
    return NULL;
}

/* ---- the check at task exit ---- */

typedef struct {
    int start_ok, end;
    char why[160];
} seen;

/* Read the records safehookd wrote since the step began and fill SEEN[i] for torch pids of TASK. */
static void read_log(int task, seen *s) {
    FILE *f = fopen(g.log, "re");
    if (!f) {
        slurm_error("safehook: cannot read the audit log %s: %s", g.log, strerror(errno));
        return;
    }
    fseeko(f, g.log_start, SEEK_SET);
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *r = json_loads(line, 0, NULL);
        json_t *peer = json_object_get(r, "peer");
        pid_t pid = (pid_t)json_integer_value(json_object_get(peer, "pid"));
        const char *ev = json_string_value(json_object_get(r, "event"));
        for (int i = 0; ev && i < g.ntorch; i++) {
            if (g.torch_task[i] != task || g.torch_pid[i] != pid)
                continue;
            if (!strcmp(ev, "end"))
                s[i].end = 1;
            if (strcmp(ev, "start"))
                continue;
            const char *origin = json_string_value(json_object_get(r, "policy"));
            const char *digest = json_string_value(json_object_get(r, "digest"));
            if (!json_is_true(json_object_get(r, "enforce")) || !origin || !strstr(origin, "system:"))
                snprintf(s[i].why, sizeof s[i].why, "start record without the enforced system policy");
            else if (g.digest[0] && (!digest || strcmp(digest, g.digest)))
                snprintf(s[i].why, sizeof s[i].why, "policy digest %.16s is not the expected %.16s",
                         digest ? digest : "(none)", g.digest);
            else
                s[i].start_ok = 1;
        }
        json_decref(r);
    }
    free(line);
    fclose(f);
}

static void check_task(int task, int status) {
    pthread_mutex_lock(&g.mu);
    seen *s = calloc((size_t)g.ntorch + 1, sizeof *s);
    if (!s) {
        pthread_mutex_unlock(&g.mu);
        return;
    }
    read_log(task, s);
    json_t *pids = json_array();
    int flagged = 0, torch = 0;
    for (int i = 0; i < g.ntorch; i++) {
        if (g.torch_task[i] != task)
            continue;
        torch++;
        const char *why = s[i].start_ok && s[i].end ? NULL
                          : s[i].why[0]             ? s[i].why
                          : !s[i].start_ok          ? "imported torch with no safehook start record"
                                                    : "no end record (killed, or exited with os._exit)";
        flagged |= why != NULL;
        json_array_append_new(pids, json_pack("{s:i,s:s?}", "pid", (int)g.torch_pid[i], "problem", why));
    }
    free(s);
    pthread_mutex_unlock(&g.mu);
    json_t *rec = record("task_check");
    json_object_set_new(rec, "task", json_integer(g.task_id[task]));
    json_object_set_new(rec, "task_pid", json_integer(g.task_pid[task]));
    json_object_set_new(rec, "exit_status", json_integer(status));
    json_object_set_new(rec, "torch_processes", pids);
    json_object_set_new(rec, "verdict", json_string(flagged ? "flagged" : "ok"));
    int r = send_record(rec);
    if (flagged)
        slurm_error("safehook: job %u step %u task %u: %d torch process(es), unprotected or unaudited", g.job,
                    g.step, g.task_id[task], torch);
    if (r < 0)
        slurm_error("safehook: cannot send the task_check record to %s: %s", g.socket, strerror(-r));
}

/* ---- SPANK callbacks ---- */

int slurm_spank_init(spank_t sp, int ac, char **av) {
    if (!spank_remote(sp))
        return 0;
    return parse_args(ac, av) < 0 ? -1 : 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    spank_get_item(sp, S_JOB_ID, &g.job);
    spank_get_item(sp, S_JOB_STEPID, &g.step);
    spank_get_item(sp, S_JOB_UID, &g.uid);
    struct stat st;
    g.log_start = stat(g.log, &st) == 0 ? st.st_size : 0;
    json_t *rec = record("job_start");
    json_object_set_new(rec, "preload", json_string(g.lib));
    int r = send_record(rec);
    if (r < 0) {
        /* No audit sink: the enforced jobs of this step could not start anyway; say why here. */
        slurm_error("safehook: safehookd at %s did not take the job_start record: %s", g.socket, strerror(-r));
    }
    __atomic_store_n(&g.running, 1, __ATOMIC_RELEASE);
    if (pthread_create(&g.thread, NULL, watch, NULL) != 0) {
        g.running = 0;
        slurm_error("safehook: cannot start the watcher thread");
    }
    return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    char cur[4096] = "", val[5120];
    if (spank_getenv(sp, "LD_PRELOAD", cur, sizeof cur) != ESPANK_SUCCESS)
        cur[0] = '\0';
    if (strstr(cur, g.lib))
        snprintf(val, sizeof val, "%s", cur);
    else
        snprintf(val, sizeof val, "%s%s%s", g.lib, cur[0] ? " " : "", cur);
    if (spank_setenv(sp, "LD_PRELOAD", val, 1) != ESPANK_SUCCESS)
        return -1;
    if (g.policy[0] && spank_setenv(sp, "SAFEHOOK_POLICY", g.policy, 1) != ESPANK_SUCCESS)
        return -1;
    return 0;
}

int slurm_spank_task_post_fork(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    pid_t pid;
    uint32_t id;
    if (spank_get_item(sp, S_TASK_PID, &pid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_TASK_GLOBAL_ID, &id) != ESPANK_SUCCESS)
        return 0;
    pthread_mutex_lock(&g.mu);
    if (g.ntasks < MAX_TASKS) {
        g.task_pid[g.ntasks] = pid;
        g.task_id[g.ntasks++] = id;
    }
    pthread_mutex_unlock(&g.mu);
    return 0;
}

int slurm_spank_task_exit(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    pid_t pid;
    int status = 0;
    if (spank_get_item(sp, S_TASK_PID, &pid) != ESPANK_SUCCESS)
        return 0;
    spank_get_item(sp, S_TASK_EXIT_STATUS, &status);
    pthread_mutex_lock(&g.mu);
    int task = -1;
    for (int i = 0; i < g.ntasks; i++)
        if (g.task_pid[i] == pid)
            task = i;
    pthread_mutex_unlock(&g.mu);
    if (task >= 0)
        check_task(task, status);
    return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    if (!spank_remote(sp) || !g.running)
        return 0;
    __atomic_store_n(&g.running, 0, __ATOMIC_RELEASE);
    pthread_join(g.thread, NULL);
    return 0;
}
