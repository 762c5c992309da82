/* Chroot escape probe: chroot into a subdirectory, climb out with ".." and chroot there.
   Against a bare chroot() by a process that may call chroot(), this reaches the real root;
   against pivot_root with the old root detached, it stays inside. argv[1] is a file that exists
   only outside the sandbox. Prints one line: the refusal, "contained" or "ESCAPED". */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: escape HOST-ONLY-FILE\n"); return 2; }
    mkdir("esc", 0755);
    if (chroot("esc") != 0) { printf("chroot(esc): %s\n", strerror(errno)); return 0; }
    for (int i = 0; i < 64; i++) if (chdir("..") != 0) break;
    if (chroot(".") != 0) { printf("chroot(.): %s\n", strerror(errno)); return 0; }
    if (access(argv[1], F_OK) == 0) printf("ESCAPED: %s is visible\n", argv[1]);
    else printf("contained\n");
    return 0;
}
