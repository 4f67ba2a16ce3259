/* The root watcher (--watch): not built yet. */
#include "shd.h"

#include <errno.h>

int sh_watch_start(void) {
    sh_say("--watch is not supported by this build");
    return -ENOSYS;
}
void sh_watch_tick(void) {}
void sh_watch_record(pid_t pid, uid_t uid, const char *event, json_t *rec, long long seq) {
    (void)pid, (void)uid, (void)event, (void)rec, (void)seq;
}
void sh_procfs_refresh(void) {}
void sh_artifact_tick(void) {}
