/* Kernel facts about a process, as root reads them from /proc: its start time, parent and uid,
 * and what it maps. A mapped file is identified by what it is, never by its name alone: its
 * device and inode (from /proc/PID/map_files, the file itself) against those of the installed
 * libsafehook.so and _core*.so, and its ELF build-id against those of the libtorch files given
 * with --torch (so a renamed or copied libtorch is still libtorch). A file whose build-id is not
 * known is libtorch when its name or its DT_SONAME says so (another torch build). */
#include "shd.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { K_OTHER, K_TORCH, K_LIB, K_CORE };

#define MAX_KNOWN 64
#define CACHE 4096

typedef struct {
    dev_t dev;
    ino_t ino;
    int kind;
} known_file;
static known_file known[MAX_KNOWN];
static int nknown;

static char torch_ids[SH_MAX_PATHS][65];
static int ntorch_ids;

/* Files classified before, by device, inode and change time (an inode number reused by a new
 * file has a new change time). */
static struct {
    dev_t dev;
    ino_t ino;
    long long ctime_ns;
    int kind;
    int used;
} cache[CACHE];

static void know(const char *path, int kind) {
    struct stat st;
    if (stat(path, &st) < 0) {
        sh_say("watch: cannot stat %s: %s", path, strerror(errno));
        return;
    }
    for (int i = 0; i < nknown; i++)
        if (known[i].dev == st.st_dev && known[i].ino == st.st_ino)
            return;
    if (nknown < MAX_KNOWN)
        known[nknown++] = (known_file){st.st_dev, st.st_ino, kind};
}

void sh_procfs_refresh(void) {
    for (int i = 0; i < sh_opt.nlib; i++)
        know(sh_opt.lib[i], K_LIB);
    for (int i = 0; i < sh_opt.ncore; i++)
        know(sh_opt.core[i], K_CORE);
}

int sh_procfs_init(void) {
    for (int i = 0; i < sh_opt.ntorch; i++) {
        int fd = open(sh_opt.torch[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            sh_say("watch: cannot open %s: %s", sh_opt.torch[i], strerror(errno));
            continue;
        }
        if (sh_elf_build_id(fd, torch_ids[ntorch_ids], sizeof torch_ids[0]) == 0)
            ntorch_ids++;
        else
            sh_say("watch: %s has no build-id; copies of it are known by name only", sh_opt.torch[i]);
        close(fd);
    }
    sh_procfs_refresh();
    return 0;
}

/* ---- ELF ---- */

static int read_at(int fd, void *buf, size_t len, off_t off) {
    ssize_t n = pread(fd, buf, len, off);
    return n == (ssize_t)len ? 0 : -EIO;
}

/* The PT_NOTE segments of a 64-bit ELF: calls FN(note type, name, desc, desc length). */
static int notes(int fd, int (*fn)(Elf64_Word, const char *, const unsigned char *, size_t, void *), void *data) {
    Elf64_Ehdr eh;
    if (read_at(fd, &eh, sizeof eh, 0) < 0 || memcmp(eh.e_ident, ELFMAG, SELFMAG) ||
        eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum > 256)
        return -ENOEXEC;
    for (int i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        if (read_at(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (Elf64_Off)i * sizeof ph)) < 0)
            return -EIO;
        if (ph.p_type != PT_NOTE || ph.p_filesz == 0 || ph.p_filesz > 65536)
            continue;
        unsigned char buf[65536];
        if (read_at(fd, buf, ph.p_filesz, (off_t)ph.p_offset) < 0)
            return -EIO;
        for (size_t at = 0; at + sizeof(Elf64_Nhdr) <= ph.p_filesz;) {
            Elf64_Nhdr nh;
            memcpy(&nh, buf + at, sizeof nh);
            size_t name_off = at + sizeof nh, desc_off = name_off + ((nh.n_namesz + 3) & ~3u);
            size_t next = desc_off + ((nh.n_descsz + 3) & ~3u);
            if (next > ph.p_filesz || nh.n_namesz == 0)
                break;
            if (fn(nh.n_type, (const char *)buf + name_off, buf + desc_off, nh.n_descsz, data))
                return 0;
            at = next;
        }
    }
    return 0;
}

struct idbuf {
    char *out;
    size_t len;
    int found;
};

static int take_id(Elf64_Word type, const char *name, const unsigned char *desc, size_t n, void *data) {
    struct idbuf *b = data;
    if (type != NT_GNU_BUILD_ID || strcmp(name, "GNU") || n == 0 || 2 * n + 1 > b->len)
        return 0;
    for (size_t i = 0; i < n; i++)
        snprintf(b->out + 2 * i, 3, "%02x", desc[i]);
    b->found = 1;
    return 1;
}

int sh_elf_build_id(int fd, char *out, size_t len) {
    struct idbuf b = {out, len, 0};
    int r = notes(fd, take_id, &b);
    if (r < 0)
        return r;
    return b.found ? 0 : -ENOENT;
}

/* DT_SONAME of a 64-bit ELF starts with "libtorch": a torch build this daemon was not told of. */
static int soname_is_torch(int fd) {
    Elf64_Ehdr eh;
    if (read_at(fd, &eh, sizeof eh, 0) < 0 || memcmp(eh.e_ident, ELFMAG, SELFMAG) ||
        eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_phnum > 256)
        return 0;
    Elf64_Phdr dyn = {0}, load[16];
    int nload = 0;
    for (int i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        if (read_at(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (Elf64_Off)i * sizeof ph)) < 0)
            return 0;
        if (ph.p_type == PT_DYNAMIC)
            dyn = ph;
        else if (ph.p_type == PT_LOAD && nload < 16)
            load[nload++] = ph;
    }
    if (!dyn.p_filesz || dyn.p_filesz > 65536)
        return 0;
    Elf64_Dyn d[4096];
    if (read_at(fd, d, dyn.p_filesz, (off_t)dyn.p_offset) < 0)
        return 0;
    Elf64_Xword strtab = 0, soname = (Elf64_Xword)-1;
    for (size_t i = 0; i < dyn.p_filesz / sizeof *d && d[i].d_tag != DT_NULL; i++) {
        if (d[i].d_tag == DT_STRTAB)
            strtab = d[i].d_un.d_ptr;
        else if (d[i].d_tag == DT_SONAME)
            soname = d[i].d_un.d_val;
    }
    if (!strtab || soname == (Elf64_Xword)-1)
        return 0;
    for (int i = 0; i < nload; i++) { /* the string table's address to its file offset */
        if (strtab >= load[i].p_vaddr && strtab < load[i].p_vaddr + load[i].p_filesz) {
            char name[9] = "";
            off_t off = (off_t)(load[i].p_offset + (strtab - load[i].p_vaddr) + soname);
            return read_at(fd, name, 8, off) == 0 && !memcmp(name, "libtorch", 8);
        }
    }
    return 0;
}

static int basename_is_torch(const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    return !strncmp(b, "libtorch", 8) && strstr(b, ".so") != NULL;
}

/* What the file mapped at RANGE of PID is. */
static int classify(pid_t pid, const char *range, const char *path) {
    char mf[128];
    snprintf(mf, sizeof mf, "/proc/%d/map_files/%s", (int)pid, range);
    int fd = open(mf, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return basename_is_torch(path) ? K_TORCH : K_OTHER;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return K_OTHER;
    }
    for (int i = 0; i < nknown; i++) {
        if (known[i].dev == st.st_dev && known[i].ino == st.st_ino) {
            close(fd);
            return known[i].kind;
        }
    }
    long long ct = (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
    unsigned h = (unsigned)(st.st_ino * 2654435761u ^ st.st_dev) % CACHE;
    if (cache[h].used && cache[h].dev == st.st_dev && cache[h].ino == st.st_ino && cache[h].ctime_ns == ct) {
        close(fd);
        return cache[h].kind;
    }
    int kind = K_OTHER;
    char id[65];
    if (S_ISREG(st.st_mode) && sh_elf_build_id(fd, id, sizeof id) == 0)
        for (int i = 0; i < ntorch_ids && kind == K_OTHER; i++)
            if (!strcmp(id, torch_ids[i]))
                kind = K_TORCH;
    if (kind == K_OTHER && (basename_is_torch(path) || (S_ISREG(st.st_mode) && soname_is_torch(fd))))
        kind = K_TORCH;
    close(fd);
    cache[h].dev = st.st_dev;
    cache[h].ino = st.st_ino;
    cache[h].ctime_ns = ct;
    cache[h].kind = kind;
    cache[h].used = 1;
    return kind;
}

int sh_proc_maps(pid_t pid, sh_maps_facts *out) {
    memset(out, 0, sizeof *out);
    char p[64], line[4608];
    snprintf(p, sizeof p, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(p, "re");
    if (!f)
        return -errno;
    /* distinct files, by the maps' own device:inode, classified once each */
    enum { SEEN = 2048 };
    static struct {
        unsigned long long ino;
        char dev[16];
    } seen[SEEN];
    int nseen = 0;
    while (fgets(line, sizeof line, f)) {
        char range[64], perms[8], dev[16], path[4096] = "";
        unsigned long long off, ino;
        if (sscanf(line, "%63s %7s %llx %15s %llu %4095[^\n]", range, perms, &off, dev, &ino, path) < 5 || !ino)
            continue;
        int dup = 0;
        for (int i = nseen - 1; i >= 0 && !dup; i--)
            dup = seen[i].ino == ino && !strcmp(seen[i].dev, dev);
        if (dup)
            continue;
        if (nseen < SEEN) {
            seen[nseen].ino = ino;
            snprintf(seen[nseen].dev, sizeof seen[nseen].dev, "%s", dev);
            nseen++;
        }
        const char *name = path;
        while (*name == ' ')
            name++;
        int k = classify(pid, range, name);
        if (k == K_TORCH && !out->torch) {
            out->torch = 1;
            snprintf(out->torch_path, sizeof out->torch_path, "%.1000s", name);
        }
        out->lib |= k == K_LIB;
        out->core |= k == K_CORE;
    }
    fclose(f);
    return 0;
}

int sh_proc_stat(pid_t pid, unsigned long long *start, pid_t *ppid, uid_t *uid) {
    char p[64], buf[1024];
    snprintf(p, sizeof p, "/proc/%d/stat", (int)pid);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = '\0';
    char *rp = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    char state;
    int pp;
    unsigned long long st;
    /* fields 3.. after ')': state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
     * utime stime cutime cstime priority nice threads itrealvalue starttime */
    if (!rp || sscanf(rp + 1, " %c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
                      &state, &pp, &st) != 3)
        return -EIO;
    if (state == 'Z' || state == 'X')
        return -ESRCH; /* exited, not yet reaped */
    if (start)
        *start = st;
    if (ppid)
        *ppid = pp;
    if (uid) {
        snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
        FILE *f = fopen(p, "re");
        unsigned u = (unsigned)-1;
        while (f && fgets(buf, sizeof buf, f))
            if (sscanf(buf, "Uid: %u", &u) == 1)
                break;
        if (f)
            fclose(f);
        if (u == (unsigned)-1)
            return -EIO;
        *uid = u;
    }
    return 0;
}

void sh_proc_exe(pid_t pid, char *buf, size_t len) {
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/exe", (int)pid);
    ssize_t n = readlink(p, buf, len - 1);
    buf[n > 0 ? n : 0] = '\0';
}
