/* safehookd: the root daemon of a shared training server.
 *
 * - The audit sink jobs cannot write to: records arrive on a UNIX seqpacket socket, are
 *   stamped with the kernel's word on their sender and appended to a hash-chained, root-owned
 *   log (serve.c, chainlog.c), optionally forwarded to journald.
 * - With --watch, a root watcher that does not depend on the job (watch.c): it learns from the
 *   kernel which processes map libtorch and whether each maps the installed libsafehook and
 *   _core and sent an activation record, and it checks the model files jobs write
 *   (artifact.c). Its verdicts are the daemon's own records.
 *
 * See the usage text below for the options and docs/server.md for the threat model. */
#include "sh_config.h"
#include "shd.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#ifdef SH_HAVE_SYSTEMD
#include <systemd/sd-journal.h>
#endif

sh_opts sh_opt;
volatile sig_atomic_t sh_stop_requested, sh_reopen_requested;

static void on_signal(int sig) {
    if (sig == SIGHUP)
        sh_reopen_requested = 1;
    else
        sh_stop_requested = 1;
}

void sh_say(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "safehookd: %s\n", buf);
#ifdef SH_HAVE_SYSTEMD
    if (sh_opt.journal)
        sd_journal_print(LOG_WARNING, "safehookd: %s", buf);
#endif
}

double sh_now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: safehookd [--socket PATH] [--log PATH] [--disk-full stop|keep] [--max-bytes N]\n"
            "                 [--log-mode OCTAL] [--journal] [LIMITS] [--watch WATCH...]\n"
            "  --socket     UNIX socket jobs connect to (default %s)\n"
            "  --log        the hash-chained audit log (default %s)\n"
            "  --disk-full  stop: refuse records so enforced jobs stop (default); keep: jobs go on,\n"
            "               a records_lost marker follows\n"
            "  --max-bytes  treat the log as full at N bytes (a quota; tests)\n"
            "  --log-mode   permission bits of the log (default 0600; 0640 lets its group read)\n"
            "  --journal    also forward every record to journald%s\n"
            "limits per uid (root is exempt):\n"
            "  --uid-conns N     connections open at once (default 256)\n"
            "  --uid-rate B      record bytes per second (default 2097152), --uid-burst B (default 4x rate)\n"
            "  --stall S         drop a client that leaves replies unread S seconds (default 2)\n"
            "  --max-clients N   all clients at once (default: the descriptor limit less 128)\n"
            "the root watcher (--watch):\n"
            "  --torch FILE      a libtorch library of this machine (repeat; its build-id identifies copies)\n"
            "  --lib FILE        the installed libsafehook.so (repeat)\n"
            "  --core FILE       the installed safehook/_core*.so (repeat)\n"
            "  --digest HEX      the policy digest activation records must carry\n"
            "  --watch-fs PATH   check model files written on PATH's filesystem (repeat)\n"
            "  --watch-uid UID   outside Slurm jobs, watch only these uids (repeat; default all)\n"
            "  --verify-cmd CMD  the safehook command for artifact checks (default: safehook)\n"
            "  --verify-base M   the site's base model, --verify-policy P the policy to check against\n"
            "  --artifact-quiet S  seconds without a write before a model file is checked (default 5)\n",
            SH_AUDIT_SOCKET, SH_AUDIT_LOG,
#ifdef SH_HAVE_SYSTEMD
            ""
#else
            " (not built in: no libsystemd)"
#endif
    );
}

static int add_path(const char **arr, int *n, const char *v) {
    if (*n >= SH_MAX_PATHS)
        return -1;
    arr[(*n)++] = v;
    return 0;
}

static int parse(int argc, char **argv) {
    enum { O_UIDC = 256, O_RATE, O_BURST, O_STALL, O_WATCH, O_TORCH, O_LIB, O_CORE, O_DIGEST, O_FS, O_WUID,
           O_VCMD, O_VBASE, O_VPOL, O_QUIET, O_MAXC };
    static const struct option opts[] = {
        {"socket", required_argument, 0, 's'}, {"log", required_argument, 0, 'l'},
        {"disk-full", required_argument, 0, 'f'}, {"max-bytes", required_argument, 0, 'm'},
        {"log-mode", required_argument, 0, 'p'}, {"journal", no_argument, 0, 'j'},
        {"uid-conns", required_argument, 0, O_UIDC}, {"uid-rate", required_argument, 0, O_RATE},
        {"uid-burst", required_argument, 0, O_BURST}, {"stall", required_argument, 0, O_STALL},
        {"watch", no_argument, 0, O_WATCH}, {"torch", required_argument, 0, O_TORCH},
        {"lib", required_argument, 0, O_LIB}, {"core", required_argument, 0, O_CORE},
        {"digest", required_argument, 0, O_DIGEST}, {"watch-fs", required_argument, 0, O_FS},
        {"watch-uid", required_argument, 0, O_WUID}, {"verify-cmd", required_argument, 0, O_VCMD},
        {"verify-base", required_argument, 0, O_VBASE}, {"verify-policy", required_argument, 0, O_VPOL},
        {"artifact-quiet", required_argument, 0, O_QUIET}, {"max-clients", required_argument, 0, O_MAXC}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int c, bad = 0;
    double burst = 0;
    while ((c = getopt_long(argc, argv, "s:l:f:m:p:jh", opts, NULL)) != -1) {
        switch (c) {
        case 's': sh_opt.socket_path = optarg; break;
        case 'l': sh_opt.log_path = optarg; break;
        case 'f':
            if (!strcmp(optarg, "stop"))
                sh_opt.full = SH_FULL_STOP;
            else if (!strcmp(optarg, "keep"))
                sh_opt.full = SH_FULL_KEEP;
            else
                bad = 1;
            break;
        case 'm': sh_opt.max_bytes = strtoll(optarg, NULL, 10); break;
        case 'p': sh_opt.log_mode = (mode_t)strtol(optarg, NULL, 8) & 0640; break;
        case 'j': sh_opt.journal = 1; break;
        case O_UIDC: sh_opt.uid_conns = atoi(optarg); break;
        case O_RATE: sh_opt.uid_rate = strtod(optarg, NULL); break;
        case O_BURST: burst = strtod(optarg, NULL); break;
        case O_STALL: sh_opt.stall_seconds = strtod(optarg, NULL); break;
        case O_WATCH: sh_opt.watch = 1; break;
        case O_TORCH: bad |= add_path(sh_opt.torch, &sh_opt.ntorch, optarg); break;
        case O_LIB: bad |= add_path(sh_opt.lib, &sh_opt.nlib, optarg); break;
        case O_CORE: bad |= add_path(sh_opt.core, &sh_opt.ncore, optarg); break;
        case O_FS: bad |= add_path(sh_opt.watch_fs, &sh_opt.nwatch_fs, optarg); break;
        case O_WUID:
            if (sh_opt.nwatch_uids >= SH_MAX_PATHS)
                bad = 1;
            else
                sh_opt.watch_uids[sh_opt.nwatch_uids++] = strtoll(optarg, NULL, 10);
            break;
        case O_DIGEST: sh_opt.digest = optarg; break;
        case O_VCMD: sh_opt.verify_cmd = optarg; break;
        case O_VBASE: sh_opt.verify_base = optarg; break;
        case O_VPOL: sh_opt.verify_policy = optarg; break;
        case O_QUIET: sh_opt.artifact_quiet = strtod(optarg, NULL); break;
        case O_MAXC: sh_opt.max_clients = atoi(optarg); break;
        case 'h': usage(stdout); exit(0);
        default: bad = 1;
        }
    }
    if (burst > 0)
        sh_opt.uid_burst = burst;
    else
        sh_opt.uid_burst = 4 * sh_opt.uid_rate;
    if (sh_opt.uid_burst < 65536 + 1024)
        sh_opt.uid_burst = 65536 + 1024; /* one record of the largest size always fits */
    if (sh_opt.uid_conns < 1 || sh_opt.uid_rate <= 0 || sh_opt.stall_seconds <= 0)
        bad = 1;
    if (bad || optind < argc) {
        usage(stderr);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    sh_opt = (sh_opts){.socket_path = SH_AUDIT_SOCKET, .log_path = SH_AUDIT_LOG, .log_mode = 0600,
                       .uid_conns = 256, .uid_rate = 2 * 1024 * 1024, .stall_seconds = 2,
                       .verify_cmd = "safehook", .artifact_quiet = 5};
    if (parse(argc, argv) < 0)
        return 2;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    off_t torn = 0;
    int r = sh_chain_open(&torn);
    if (r < 0) {
        sh_say("cannot open the log %s: %s", sh_opt.log_path, strerror(-r));
        return 1;
    }
    int lfd = sh_open_socket();
    if (lfd < 0) {
        sh_say("cannot listen on %s: %s", sh_opt.socket_path, strerror(-lfd));
        return 1;
    }
    json_t *start = sh_chain_daemon_record("daemon_start");
    json_object_set_new(start, "version", json_string(SH_VERSION));
    json_object_set_new(start, "socket", json_string(sh_opt.socket_path));
    json_object_set_new(start, "disk_full", json_string(sh_opt.full == SH_FULL_STOP ? "stop" : "keep"));
    json_object_set_new(start, "watch", json_boolean(sh_opt.watch));
    if (torn)
        json_object_set_new(start, "torn_tail_bytes", json_integer(torn));
    sh_chain_daemon(start);
    r = sh_serve(lfd);
    if (r < 0)
        sh_say("stopping: %s", strerror(-r));
    close(lfd);
    unlink(sh_opt.socket_path);
    json_t *stop = sh_chain_daemon_record("daemon_stop");
    if (sh_chain_lost())
        json_object_set_new(stop, "records_lost", json_integer(sh_chain_lost()));
    sh_chain_write(stop, 0);
    sh_chain_close();
    return r < 0 ? 1 : 0;
}
