/* The client of safehookd: a record whose reply timed out leaves that connection for good (a
 * late reply must never be read as the next record's), and a connection the daemon closed is
 * replaced before the record goes. A scripted daemon in a thread plays the other side. */
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "audit.h"
#include "audit_sink.h"
#include "check.h"

static char sock_path[100];
static int lfd;
static char got[3][64];

static int take(int fd, char *into) {
    ssize_t n = recv(fd, into, 63, 0);
    if (n > 0)
        into[n] = '\0';
    return (int)n;
}

static void *daemon_script(void *unused) {
    (void)unused;
    int c1 = accept(lfd, NULL, NULL);
    take(c1, got[0]);
    usleep(300 * 1000); /* longer than the client's 100 ms: it has given up on this reply... */
    send(c1, "E", 1, MSG_NOSIGNAL); /* ...which arrives late, on the old connection */
    int c2 = accept(lfd, NULL, NULL); /* the next record comes on a new one */
    take(c2, got[1]);
    send(c2, "O", 1, MSG_NOSIGNAL);
    close(c2); /* the daemon restarts, or dropped this client */
    int c3 = accept(lfd, NULL, NULL);
    take(c3, got[2]);
    send(c3, "O", 1, MSG_NOSIGNAL);
    usleep(100 * 1000);
    close(c1);
    close(c3);
    return NULL;
}

int main(void) {
    const char *dir = getenv("SH_TEST_TMP");
    snprintf(sock_path, sizeof sock_path, "%s/audit-sink-test.sock", dir ? dir : "/tmp");
    unlink(sock_path);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_path);
    lfd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    CHECK_INT(bind(lfd, (struct sockaddr *)&addr, sizeof addr), 0);
    CHECK_INT(listen(lfd, 8), 0);
    pthread_t t;
    pthread_create(&t, NULL, daemon_script, NULL);

    sh_audit_sink_set_timeout(100);
    CHECK_INT(sh_audit_connect(sock_path), 0);
    CHECK_INT(sh_audit_emit("one", -1, NULL), -ETIMEDOUT);
    usleep(400 * 1000); /* the late 'E' is in the old connection's queue by now */
    CHECK_INT(sh_audit_emit("two", -1, NULL), 0);
    usleep(50 * 1000);
    CHECK_INT(sh_audit_emit("three", -1, NULL), 0); /* EPIPE on the closed one: sent again on a new one */
    pthread_join(t, NULL);
    CHECK(strstr(got[0], "\"one\"") != NULL);
    CHECK(strstr(got[1], "\"two\"") != NULL);
    CHECK(strstr(got[2], "\"three\"") != NULL);
    sh_audit_close();
    close(lfd);
    unlink(sock_path);
    CHECK_DONE();
}
