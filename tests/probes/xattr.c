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

#ifdef __x86_64__
/* chmod through the i386 ABI (int 0x80, syscall 15): the path must lie below 4 GiB, which it
   does in a static non-PIE binary's data segment */
static char i386_path[4096];
static long chmod_i386(const char *f, long mode) {
    long rc;
    strncpy(i386_path, f, sizeof i386_path - 1);
    __asm__ volatile ("int $0x80" : "=a"(rc) : "a"(15L), "b"((long)(unsigned long)i386_path), "c"(mode) : "memory");
    if (rc < 0) { errno = (int)-rc; return -1; }
    return rc;
}
#endif

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
#ifdef __x86_64__
    report("i386 chmod 4755", chmod_i386(f, 04755));
    report("x32 chmod 4755", syscall(0x40000000 | SYS_chmod, f, 04755));
    report("i386 chmod 0755", chmod_i386(f, 0755));
    report("x32 chmod 0755", syscall(0x40000000 | SYS_chmod, f, 0755));
#endif
    return 0;
}
