/* safehookd's internal interfaces: the chained log (chainlog.c), the socket server with its
 * per-uid limits (serve.c), the root watcher of torch processes (watch.c, procfs.c) and of the
 * model files jobs write (artifact.c). One thread: everything runs from the epoll loop in
 * serve.c, so none of this needs a lock. */
#ifndef SHD_H
#define SHD_H

#include <jansson.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- safehookd.c: options and messages ---- */

enum sh_full_action { SH_FULL_STOP, SH_FULL_KEEP };

#define SH_MAX_PATHS 16

typedef struct {
    const char *socket_path;
    const char *log_path;
    enum sh_full_action full;
    long long max_bytes; /* 0: no limit but the disk's */
    mode_t log_mode;
    int journal;
    /* per-uid limits (root is exempt: its own services) */
    int uid_conns;          /* connections open at once per uid */
    int max_clients;        /* all clients (0: from RLIMIT_NOFILE) */
    double uid_rate;        /* bytes per second per uid */
    double uid_burst;       /* bucket size, bytes */
    double stall_seconds;   /* a client that leaves replies unread this long is dropped */
    /* the watcher */
    int watch;
    const char *torch[SH_MAX_PATHS]; /* libtorch files: marked, and their build-ids known */
    int ntorch;
    const char *lib[SH_MAX_PATHS]; /* installed libsafehook.so */
    int nlib;
    const char *core[SH_MAX_PATHS]; /* installed safehook/_core*.so */
    int ncore;
    const char *watch_fs[SH_MAX_PATHS]; /* filesystems whose written model files are checked */
    int nwatch_fs;
    long long watch_uids[SH_MAX_PATHS]; /* only these uids outside Slurm jobs (tests); none: all */
    int nwatch_uids;
    const char *digest; /* the expected policy digest of activation records, or NULL */
    const char *verify_cmd; /* "safehook" or "PYTHON -m safehook": the artifact check */
    const char *verify_base;
    const char *verify_policy;
    double artifact_quiet; /* seconds without a write before a model file is checked */
} sh_opts;

extern sh_opts sh_opt;

/* A message on stderr, and to journald with --journal (LOG_WARNING). */
void sh_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

double sh_now(void);

/* ---- chainlog.c: the hash-chained log ---- */

/* Open the log (creating it and its folders), cut a torn tail and load the chain state from the
 * last line, whatever its length. TORN: bytes cut. Returns 0 or a negative errno. */
int sh_chain_open(off_t *torn);

/* SIGHUP: reopen the log path (logrotate moved the file away). A new, empty file starts with a
 * "log_reopened" record that chains on from the old file's last line; the same file is kept
 * as it is. Returns 0 or a negative errno (the old file stays open). */
int sh_chain_reopen(void);

/* A record of the daemon's own: {event, time, pid, peer: the daemon}. */
json_t *sh_chain_daemon_record(const char *event);

/* Stamp REC (owned) with seq and prev and append it as one line. RESERVE: keep the disk
 * reserve of the disk_full marker free (every record but that marker). Returns 0, -ENOSPC
 * (the log is full: nothing written), or a negative errno. Forwarded to journald on success. */
int sh_chain_write(json_t *rec, int reserve);

/* Write REC (owned) as a client's record: on a full log, the disk_full marker and the
 * disk_full=stop|keep handling. Returns the reply byte: 'O' taken, 'F' refused (full). */
char sh_chain_take(json_t *rec);

/* Write a daemon record (owned) with the full-disk handling; failures are said on stderr. */
void sh_chain_daemon(json_t *rec);

long long sh_chain_seq(void);
long long sh_chain_lost(void);
void sh_chain_close(void);

/* ---- serve.c: the socket ---- */

int sh_serve(int listen_fd);
int sh_open_socket(void);

/* Register FD with the loop; ON_READY is called when it is readable. */
typedef void (*sh_ready_fn)(int fd, void *data);
int sh_loop_add(int fd, sh_ready_fn on_ready, void *data);
void sh_loop_del(int fd);

/* ---- watch.c: which processes run torch, and whether they are protected ---- */

/* Set up the watcher (proc connector, fanotify, timers) when --watch is given. 0 or -errno. */
int sh_watch_start(void);

/* Called every ~100 ms from the loop. */
void sh_watch_tick(void);

/* A record the daemon took from PID (the kernel's sender) of UID; EVENT is its event name.
 * The watcher notes activations ("activate"), and, from root only, Slurm's task marks. */
void sh_watch_record(pid_t pid, uid_t uid, const char *event, json_t *rec, long long seq);

/* The Slurm job a process belongs to, by the kernel's fork lineage from a task root marked by
 * slurmstepd; NULL when none. Fills JOB/STEP/TASK. */
int sh_watch_job_of(pid_t pid, long long *job, long long *step, long long *task);

/* uid/pid filter for the watcher outside Slurm jobs (--watch-uid). */
int sh_watch_uid_wanted(uid_t uid);

/* ---- artifact.c: model files written by jobs, checked by root ---- */

int sh_artifact_start(int fan_fd_flags);
void sh_artifact_tick(void);
/* A process exited: its written files may be checked now. */
void sh_artifact_writer_exited(pid_t pid);
/* A Slurm task ended: check its files now; returns how many are pending for it. */
int sh_artifact_task_pending(long long job, long long step, long long task);
/* Append the verdicts of the task's checked files to ARR. */
void sh_artifact_task_results(long long job, long long step, long long task, json_t *arr);

/* ---- procfs.c: kernel facts about a process ---- */

typedef struct {
    int torch, lib, core; /* maps a libtorch file / the installed libsafehook / the installed _core */
    char torch_path[1024];
} sh_maps_facts;

/* Start time (clock ticks since boot) and parent of PID from /proc/PID/stat; 0 or -errno. */
int sh_proc_stat(pid_t pid, unsigned long long *start, pid_t *ppid, uid_t *uid);

/* What PID maps, from /proc/PID/maps and /proc/PID/map_files (device and inode of each
 * mapped file, compared with the installed files and libtorch's build-ids). 0 or -errno. */
int sh_proc_maps(pid_t pid, sh_maps_facts *out);

/* /proc/PID/exe's target into BUF (empty when unreadable). */
void sh_proc_exe(pid_t pid, char *buf, size_t len);

/* Load the build-ids of the --torch files and stat the installed files. 0 or -errno. */
int sh_procfs_init(void);

/* Re-stat the installed files (a reinstall gives them new inodes; old ones stay known). */
void sh_procfs_refresh(void);

/* The ELF build-id note of the file open at FD, hex into OUT (at most 2*32+1). 0 or -errno. */
int sh_elf_build_id(int fd, char *out, size_t len);

#endif
