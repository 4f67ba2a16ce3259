/* safehook_spank.so: Slurm SPANK plugin that deploys safehook on every task of every job, and
 * tells safehookd's root watcher which processes are whose.
 *
 * plugstack.conf:
 *   required /usr/lib/.../safehook_spank.so lib=/path/libsafehook.so [socket=/run/safehook/audit.sock]
 *            [log=/var/log/safehook/audit.jsonl] [policy=/path/user-policy.json] [wait=SECONDS]
 *
 * In slurmstepd (root), per step:
 *   user_init       sends "job_start" (job, step, uid) to safehookd;
 *   task_init       (in the task, before exec) puts lib in LD_PRELOAD (and policy in SAFEHOOK_POLICY);
 *   task_post_fork  sends "task_start" with the task's pid, before the task is let run: the daemon
 *                   follows that process's lineage from the kernel's fork events from then on;
 *   task_exit       sends "task_end" with the exit status;
 *   exit            (after Slurm has stopped what it could find of the step) sends "step_end", then
 *                   waits up to wait= seconds (default 60) for the daemon's "watch_task" verdict of
 *                   each task, and says a flagged one in slurmd's log.
 * The verdicts are the daemon's own records, from kernel facts (daemon/watch.c): which processes
 * of the task mapped libtorch, whether each mapped the installed libsafehook and _core and sent
 * an activation record, which outlived the step, and the model files they wrote. Nothing here
 * reads what a job sent. Only root may send these marks (safehookd refuses them from others). */
#include <errno.h>
#include <jansson.h>
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

static struct {
    char lib[1024], socket[1024], log[1024], policy[1024];
    int wait_s;
    uint32_t job, step;
    uid_t uid;
    off_t log_start;
    uint32_t task_id[MAX_TASKS];
    int ntasks;
} g;

static void copy_arg(char *dst, size_t n, const char *v) { snprintf(dst, n, "%s", v); }

static int parse_args(int ac, char **av) {
    copy_arg(g.socket, sizeof g.socket, SH_AUDIT_SOCKET);
    copy_arg(g.log, sizeof g.log, SH_AUDIT_LOG);
    g.wait_s = 60;
    for (int i = 0; i < ac; i++) {
        const char *a = av[i];
        if (!strncmp(a, "lib=", 4))
            copy_arg(g.lib, sizeof g.lib, a + 4);
        else if (!strncmp(a, "socket=", 7))
            copy_arg(g.socket, sizeof g.socket, a + 7);
        else if (!strncmp(a, "log=", 4))
            copy_arg(g.log, sizeof g.log, a + 4);
        else if (!strncmp(a, "policy=", 7))
            copy_arg(g.policy, sizeof g.policy, a + 7);
        else if (!strncmp(a, "wait=", 5))
            g.wait_s = atoi(a + 5);
        else if (!strncmp(a, "digest=", 7))
            ; /* older plugstack lines: the daemon's --digest checks activation records now */
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
    return json_pack("{s:s,s:I,s:I,s:I}", "event", event, "job", (json_int_t)g.job, "job_step", (json_int_t)g.step,
                     "uid", (json_int_t)g.uid);
}

static void send_or_say(json_t *rec, const char *what) {
    int r = send_record(rec);
    if (r < 0)
        slurm_error("safehook: safehookd at %s did not take the %s record: %s", g.socket, what, strerror(-r));
}

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
    send_or_say(rec, "job_start");
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
    if (g.ntasks < MAX_TASKS)
        g.task_id[g.ntasks++] = id;
    json_t *rec = record("task_start");
    json_object_set_new(rec, "task", json_integer(id));
    json_object_set_new(rec, "task_pid", json_integer(pid));
    send_or_say(rec, "task_start");
    return 0;
}

int slurm_spank_task_exit(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    pid_t pid;
    uint32_t id;
    int status = 0;
    if (spank_get_item(sp, S_TASK_PID, &pid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_TASK_GLOBAL_ID, &id) != ESPANK_SUCCESS)
        return 0;
    spank_get_item(sp, S_TASK_EXIT_STATUS, &status);
    json_t *rec = record("task_end");
    json_object_set_new(rec, "task", json_integer(id));
    json_object_set_new(rec, "task_pid", json_integer(pid));
    json_object_set_new(rec, "exit_status", json_integer(status));
    send_or_say(rec, "task_end");
    return 0;
}

/* Read the daemon's watch_task records of this step written since it began; say the flagged
 * ones. Returns how many of this step's tasks have a verdict. */
static int read_verdicts(int say) {
    FILE *f = fopen(g.log, "re");
    if (!f)
        return 0;
    fseeko(f, g.log_start, SEEK_SET);
    char *line = NULL;
    size_t cap = 0;
    int n = 0;
    while (getline(&line, &cap, f) > 0) {
        if (!strstr(line, "\"watch_task\""))
            continue;
        json_t *r = json_loads(line, 0, NULL);
        if (json_integer_value(json_object_get(r, "job")) == g.job &&
            json_integer_value(json_object_get(r, "job_step")) == g.step &&
            !strcmp(json_string_value(json_object_get(r, "event")) ?: "", "watch_task")) {
            n++;
            const char *v = json_string_value(json_object_get(r, "verdict"));
            if (say && v && strcmp(v, "ok"))
                slurm_error("safehook: job %u step %u task %lld: %s (seq %lld in %s)", g.job, g.step,
                            (long long)json_integer_value(json_object_get(r, "task")), v,
                            (long long)json_integer_value(json_object_get(r, "seq")), g.log);
        }
        json_decref(r);
    }
    free(line);
    fclose(f);
    return n;
}

int slurm_spank_exit(spank_t sp, int ac, char **av) {
    (void)ac;
    (void)av;
    if (!spank_remote(sp) || !g.ntasks)
        return 0;
    send_or_say(record("step_end"), "step_end");
    for (int i = 0; i < g.wait_s * 10; i++) {
        if (read_verdicts(0) >= g.ntasks) {
            read_verdicts(1);
            return 0;
        }
        usleep(100 * 1000);
    }
    if (g.wait_s > 0)
        slurm_error("safehook: job %u step %u: no watch_task verdict from safehookd in %d s (is it run with --watch?)",
                    g.job, g.step, g.wait_s);
    return 0;
}
