/* Client of safehookd (daemon/safehookd.c): a UNIX seqpacket connection; the daemon takes the
 * peer's uid and pid from the kernel (SO_PEERCRED), so a record cannot claim another sender. */
#include "audit_sink.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

int sh_audit_sink_connect(const char *socket_path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, socket_path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct timeval tv = {.tv_sec = 5};
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
        return errno == EAGAIN ? -ETIMEDOUT : -errno;
    if ((size_t)n != len)
        return -EMSGSIZE;
    char reply;
    do
        n = recv(fd, &reply, 1, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? -ETIMEDOUT : -errno;
    if (n == 0)
        return -ECONNRESET;
    return reply == 'O' ? 0 : reply == 'F' ? -ENOSPC : -EINVAL;
}
