/* The preload's own view of the system policy, and its refusal record: libc only (this library
 * links no JSON parser and no Python).
 *
 * The scanner must never call a policy advisory that jansson (which the core parses it with)
 * would read as enforced, or reject. It says "advisory" only for a document it fully checks as
 * strict JSON in the subset jansson accepts with JSON_REJECT_DUPLICATES (no duplicate key at any
 * level, no escape or non-ASCII byte in any key, no \u0000, nesting under 32), whose top-level
 * "enforce" is absent or the literal false. Anything else, "enforce": true included, reads as
 * enforced: an escaped key ("enforc\u0065"), a duplicate "enforce", 1 for true, trailing bytes. */
#include "preload.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "system_path.h"

#define MAX_DEPTH 32
#define MAX_KEYS 128

typedef struct {
    const char *p, *end;
    int enforce_seen, enforce_true;
    char *socket;
    size_t socket_cap;
} scan;

static void ws(scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* The length of the valid UTF-8 sequence at P (at most END), as jansson checks it (no overlong
 * form, no surrogate, nothing above U+10FFFF), or 0. */
static int utf8(const unsigned char *p, const unsigned char *end) {
    int n;
    unsigned cp;
    if (*p < 0x80)
        return 1;
    if (*p >= 0xC2 && *p <= 0xDF)
        n = 2, cp = *p & 0x1F;
    else if (*p >= 0xE0 && *p <= 0xEF)
        n = 3, cp = *p & 0x0F;
    else if (*p >= 0xF0 && *p <= 0xF4)
        n = 4, cp = *p & 0x07;
    else
        return 0;
    if (end - p < n)
        return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

static int hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

/* A string at s->p ('"'); *PLAIN: no escape and only printable ASCII (a key may only be that). */
static int string(scan *s, const char **start, size_t *len, int *plain) {
    if (s->p >= s->end || *s->p != '"')
        return -1;
    *start = ++s->p;
    *plain = 1;
    while (s->p < s->end && *s->p != '"') {
        unsigned char c = (unsigned char)*s->p;
        if (c < 0x20)
            return -1;
        if (c >= 0x80) {
            int n = utf8((const unsigned char *)s->p, (const unsigned char *)s->end);
            if (!n)
                return -1; /* jansson refuses invalid UTF-8 */
            *plain = 0;
            s->p += n;
            continue;
        }
        if (c == '\\') {
            *plain = 0;
            if (s->p + 1 >= s->end)
                return -1;
            char e = s->p[1];
            if (e == 'u') {
                if (s->p + 5 >= s->end || !hex(s->p[2]) || !hex(s->p[3]) || !hex(s->p[4]) || !hex(s->p[5]))
                    return -1;
                if (!memcmp(s->p + 2, "0000", 4))
                    return -1; /* jansson refuses NUL in strings */
                s->p += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e))
                return -1;
            s->p += 2;
            continue;
        }
        s->p++;
    }
    if (s->p >= s->end)
        return -1;
    *len = (size_t)(s->p - *start);
    s->p++;
    return 0;
}

static int number(scan *s) {
    const char *p = s->p;
    if (p < s->end && *p == '-')
        p++;
    if (p >= s->end)
        return -1;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    else
        return -1;
    if (p < s->end && *p == '.') {
        p++;
        if (p >= s->end || *p < '0' || *p > '9')
            return -1;
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < s->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < s->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= s->end || *p < '0' || *p > '9')
            return -1;
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    }
    s->p = p;
    return 0;
}

static int literal(scan *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n))
        return -1;
    s->p += n;
    return 0;
}

static int value(scan *s, int depth, int key_kind);

enum { KEY_OTHER, KEY_ENFORCE, KEY_AUDIT, KEY_SOCKET };

/* An object; DEPTH 1 is the policy itself, KIND what the key holding it was. */
static int object(scan *s, int depth, int kind) {
    const char *keys[MAX_KEYS];
    size_t lens[MAX_KEYS];
    int n = 0;
    s->p++; /* '{' */
    ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 0;
    }
    for (;;) {
        ws(s);
        const char *k;
        size_t kl;
        int plain;
        if (string(s, &k, &kl, &plain) < 0 || !plain || n >= MAX_KEYS)
            return -1;
        for (int i = 0; i < n; i++)
            if (lens[i] == kl && !memcmp(keys[i], k, kl))
                return -1; /* a duplicate: jansson rejects it */
        keys[n] = k;
        lens[n++] = kl;
        int child = KEY_OTHER;
        if (depth == 1 && kl == 7 && !memcmp(k, "enforce", 7))
            child = KEY_ENFORCE;
        else if (depth == 1 && kl == 5 && !memcmp(k, "audit", 5))
            child = KEY_AUDIT;
        else if (depth == 2 && kind == KEY_AUDIT && kl == 6 && !memcmp(k, "socket", 6))
            child = KEY_SOCKET;
        ws(s);
        if (s->p >= s->end || *s->p != ':')
            return -1;
        s->p++;
        ws(s);
        if (value(s, depth, child) < 0)
            return -1;
        ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == '}') {
            s->p++;
            return 0;
        }
        return -1;
    }
}

static int array(scan *s, int depth) {
    s->p++; /* '[' */
    ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return 0;
    }
    for (;;) {
        ws(s);
        if (value(s, depth, KEY_OTHER) < 0)
            return -1;
        ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            return 0;
        }
        return -1;
    }
}

static int value(scan *s, int depth, int kind) {
    if (s->p >= s->end || depth >= MAX_DEPTH)
        return -1;
    char c = *s->p;
    if (kind == KEY_ENFORCE) {
        s->enforce_seen = 1;
        if (literal(s, "false") == 0)
            return 0;
        s->enforce_true = 1; /* true, or anything else: enforced */
        return literal(s, "true");
    }
    if (c == '{')
        return object(s, depth + 1, kind);
    if (c == '[')
        return array(s, depth + 1);
    if (c == '"') {
        const char *v;
        size_t vl;
        int plain;
        if (string(s, &v, &vl, &plain) < 0)
            return -1;
        if (kind == KEY_SOCKET && plain && vl < s->socket_cap) {
            memcpy(s->socket, v, vl);
            s->socket[vl] = '\0';
        }
        return 0;
    }
    if (c == 't')
        return literal(s, "true");
    if (c == 'f')
        return literal(s, "false");
    if (c == 'n')
        return literal(s, "null");
    return number(s);
}

int sh_preload_scan_policy(const char *text, size_t len, char *socket, size_t socket_cap) {
    scan s = {.p = text, .end = text + len, .socket = socket, .socket_cap = socket_cap};
    if (memchr(text, '\0', len))
        return SH_SYS_ENFORCED;
    ws(&s);
    if (s.p >= s.end || *s.p != '{' || object(&s, 1, KEY_OTHER) < 0)
        return SH_SYS_ENFORCED; /* not certain what jansson makes of it */
    ws(&s);
    if (s.p != s.end)
        return SH_SYS_ENFORCED; /* trailing bytes: jansson refuses the file */
    return s.enforce_true ? SH_SYS_ENFORCED : SH_SYS_ADVISORY;
}

int sh_preload_system_policy(const char *path, char *socket, size_t socket_cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return sh_system_absence_trusted(path) ? SH_SYS_NONE : SH_SYS_HIDDEN;
        return SH_SYS_ENFORCED; /* exists but unreadable: it may be */
    }
    static char buf[1 << 16];
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf && (n = read(fd, buf + len, sizeof buf - len)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return SH_SYS_ENFORCED;
        }
        len += (size_t)n;
    }
    close(fd);
    if (len == sizeof buf)
        return SH_SYS_ENFORCED; /* larger than this scanner reads: assume the worst */
    return sh_preload_scan_policy(buf, len, socket, socket_cap);
}

/* TEXT as a JSON string body (quotes, backslashes and control bytes escaped; bytes >= 0x80
 * replaced, the daemon wants UTF-8 and this text is ours). */
static size_t escape(char *out, size_t cap, const char *text) {
    size_t j = 0;
    for (; *text && j + 7 < cap; text++) {
        unsigned char c = (unsigned char)*text;
        if (c == '"' || c == '\\') {
            out[j++] = '\\';
            out[j++] = (char)c;
        } else if (c < 0x20 || c >= 0x80) {
            j += (size_t)snprintf(out + j, cap - j, "\\u%04x", c < 0x20 ? c : '?');
        } else {
            out[j++] = (char)c;
        }
    }
    out[j] = '\0';
    return j;
}

void sh_preload_send_refusal(const char *socket_path, const char *why, const char *system, const char *lib) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!socket_path || strlen(socket_path) >= sizeof addr.sun_path)
        return;
    strcpy(addr.sun_path, socket_path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char w[1200], sp[1200], lp[1200], rec[4096];
    escape(w, sizeof w, why);
    escape(sp, sizeof sp, system);
    escape(lp, sizeof lp, lib);
    struct timeval now;
    gettimeofday(&now, NULL);
    int n = snprintf(rec, sizeof rec,
                     "{\"event\":\"refused\",\"time\":%ld.%06ld,\"pid\":%d,\"why\":\"%s\",\"system_policy\":\"%s\","
                     "\"lib\":\"%s\"}",
                     (long)now.tv_sec, (long)now.tv_usec, (int)getpid(), w, sp, lp);
    if (n > 0 && (size_t)n < sizeof rec && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 &&
        send(fd, rec, (size_t)n, MSG_NOSIGNAL) == n) {
        char reply;
        ssize_t r = recv(fd, &reply, 1, 0);
        (void)r;
    }
    close(fd);
}
