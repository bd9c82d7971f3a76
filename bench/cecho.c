/* Kernel-limit baseline for the benchmarks: the smallest blocking echo server in C.
 * Usage: cecho tcp|udp PORT   (PORT 0 picks one; prints "listening PORT").
 * TCP: one client at a time, read -> write until it closes. UDP: recvfrom -> sendto. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[1 << 20];

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: cecho tcp|udp PORT\n"); return 2; }
    int udp = strcmp(argv[1], "udp") == 0;
    int fd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    if (!udp && listen(fd, 100) < 0) { perror("listen"); return 1; }
    printf("listening %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    if (udp) {
        for (;;) {
            struct sockaddr_in peer;
            socklen_t plen = sizeof peer;
            ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
            if (n >= 0) sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
        }
    }
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (;;) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n <= 0) break;
            ssize_t off = 0;
            while (off < n) {
                ssize_t w = write(c, buf + off, (size_t)(n - off));
                if (w <= 0) break;
                off += w;
            }
        }
        close(c);
    }
}
