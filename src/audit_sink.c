/* Client of safehookd (daemon/safehookd.c): a UNIX seqpacket connection, one record per
 * message, one reply byte per record. The daemon takes the sender's uid and pid of every
 * message from the kernel (SCM_CREDENTIALS), so a record cannot claim another sender. */
#include "audit_sink.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static int timeout_ms = 5000;

void sh_audit_sink_set_timeout(int ms) { timeout_ms = ms > 0 ? ms : 5000; }

int sh_audit_sink_connect(const char *socket_path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, socket_path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    int r = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        r = -errno;
    while (r == 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (errno != EINTR)
            r = -errno;
    }
    if (r < 0) {
        close(fd);
        return r;
    }
    return fd;
}

int sh_audit_sink_send(int fd, const char *text, size_t len) {
    ssize_t n;
    do
        n = send(fd, text, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
    if ((size_t)n != len)
        return -EMSGSIZE;
    char reply;
    do
        n = recv(fd, &reply, 1, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -ECONNABORTED;
    if (n == 0)
        return -ECONNABORTED;
    switch (reply) {
    case 'O': return 0;
    case 'F': return -ENOSPC;
    case 'T': return -EBUSY;
    case 'R': return -EPERM;
    default: return -EINVAL;
    }
}
