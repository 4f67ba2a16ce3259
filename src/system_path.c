/* The trust rule for a missing system policy (see system_path.h). */
#include "system_path.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

/* The inode of the initial user namespace's nsfs file (the kernel's PROC_USER_INIT_INO). */
#define INIT_USER_NS_INO 0xEFFFFFFDUL

int sh_system_absence_trusted(const char *path) {
    struct stat st;
    if (stat("/proc/self/ns/user", &st) != 0 || (unsigned long)st.st_ino != INIT_USER_NS_INO)
        return 0; /* no /proc to ask, or a user namespace: mounts of the user's may hide it */
    char dir[4096];
    if (!path || path[0] != '/' || snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir)
        return 0;
    for (;;) {
        char *slash = strrchr(dir, '/');
        if (!slash)
            return 0;
        if (slash == dir)
            slash[1] = '\0'; /* "/" */
        else
            *slash = '\0';
        if (lstat(dir, &st) == 0) {
            if (!S_ISDIR(st.st_mode) || st.st_uid != 0)
                return 0;
            return !(st.st_mode & (S_IWGRP | S_IWOTH)) || (st.st_mode & S_ISVTX);
        }
        if (slash == dir)
            return 0;
    }
}
