/* inotify_hold N [hold]: open up to N inotify instances, print "held K" and, if an
 * instance was refused, "refused <errno name>"; with "hold", keep them until killed.
 * Built static on the host (tests/integration/test_hostile_engine.py) into a FROM-scratch image. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long wanted = argc > 1 ? strtol(argv[1], NULL, 10) : 1;
    long held = 0;
    int refused = 0;
    while (held < wanted) {
        if (inotify_init1(IN_CLOEXEC) < 0) {
            refused = errno;
            break;
        }
        held++;
    }
    printf("held %ld\n", held);
    if (refused)
        printf("refused %s\n", refused == EMFILE ? "EMFILE" : strerror(refused));
    fflush(stdout);
    if (argc > 2 && strcmp(argv[2], "hold") == 0)
        for (;;)
            pause();
    return 0;
}
