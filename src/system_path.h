/* Whether a missing system policy means "none is installed" or may be a policy hidden from
 * this process. Shared by the preload bootstrap (hooks/preload.c, libc only) and the core. */
#ifndef SH_SYSTEM_PATH_H
#define SH_SYSTEM_PATH_H

/* 1 when ENOENT/ENOTDIR on PATH can be trusted to mean there is no such file: the process is in
 * the initial user namespace (an unprivileged user can mount over a path only inside a user
 * namespace of their own) and the deepest existing folder on the path is root's and writable
 * by root only (or sticky), so no user can have removed the file. 0 otherwise: a policy may be
 * in force that this process cannot see. Uses only libc. */
int sh_system_absence_trusted(const char *path);

#endif
