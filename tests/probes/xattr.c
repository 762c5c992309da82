/* Syscall probe for the seccomp rules: set*xattr and chmod-family calls with and without the
   setuid/setgid bits, each reported as "name: ok" or "name: <strerror>". argv[1] is a file. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

static void report(const char *what, long rc) { printf("%s: %s\n", what, rc == 0 ? "ok" : strerror(errno)); }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: xattr FILE\n"); return 2; }
    const char *f = argv[1];
    int fd = open(f, O_RDONLY);
    report("setxattr", setxattr(f, "user.x", "1", 1, 0));
    report("lsetxattr", lsetxattr(f, "user.x", "1", 1, 0));
    report("fsetxattr", fsetxattr(fd, "user.x", "1", 1, 0));
    report("chmod 4755", syscall(SYS_chmod, f, 04755));
    report("fchmod 2755", syscall(SYS_fchmod, fd, 02755));
    report("fchmodat 6755", syscall(SYS_fchmodat, AT_FDCWD, f, 06755));
#ifdef SYS_fchmodat2
    report("fchmodat2 4755", syscall(SYS_fchmodat2, AT_FDCWD, f, 04755, 0));
#else
    report("fchmodat2 4755", syscall(452, AT_FDCWD, f, 04755, 0));
#endif
    report("chmod 0755", syscall(SYS_chmod, f, 0755));
    report("fchmodat 0700", syscall(SYS_fchmodat, AT_FDCWD, f, 0700));
    return 0;
}
