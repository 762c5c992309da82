# A builder script (busybox sh) that writes into $out everything it can observe of its sandbox,
# one file per aspect, without timestamps, pty numbers or host-specific paths, so that two
# builds of the same derivation (by Nix and by nartool) can be compared file by file.
# no 'set -e': a command failing is itself an observation (its message lands in the file), and
# both builds run the same script
BB=${builder%/sh}
# applets through a private directory of symlinks (created under /tmp, listed last)
mkdir /tmp/fp-bin && for a in $($BB/busybox --list); do ln -s $BB/busybox /tmp/fp-bin/$a; done
PATH=/tmp/fp-bin
o=$out
mkdir $o
# taken first, before anything else opens files
ls /proc/$$/fd > $o/fd-numbers
for f in /proc/$$/fd/*; do echo "${f##*/} $(readlink $f | sed 's/[0-9][0-9]*/N/g')"; done > $o/fd-targets
echo "$0" > $o/argv0
echo "$$ $PPID" > $o/pid-ppid
tr '\0' '\n' < /proc/1/cmdline > $o/pid1-cmdline
tr '\0' '\n' < /proc/1/environ > $o/environ-order
env | sort > $o/env-sorted
id > $o/id
umask > $o/umask
pwd > $o/cwd
hostname > $o/hostname
cat /proc/sys/kernel/hostname /proc/sys/kernel/domainname > $o/uts
if [ -t 1 ]; then echo stdout-is-a-tty; else echo stdout-not-a-tty; fi > $o/tty
if [ -t 0 ]; then echo stdin-is-a-tty; else echo stdin-not-a-tty; fi >> $o/tty
stat -L -c '%F %t:%T' /proc/$$/fd/0 > $o/stdin
stty -a < /proc/$$/fd/1 > $o/stty 2>&1 || echo "stty failed" >> $o/stty
grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]*|NoNewPrivs|Seccomp[a-z_]*|Sig(Blk|Ign)|Umask):' /proc/$$/status > $o/status
cat /proc/$$/personality > $o/personality
cat /proc/$$/limits > $o/limits
{ ulimit -c; ulimit -n; ulimit -Hn; } > $o/ulimit
cat /proc/$$/uid_map /proc/$$/gid_map /proc/$$/setgroups > $o/id-maps 2>&1 || true
# mount table: mount point, options, optional fields (peer group numbers masked), type, source, super options
awk '{ s = ""; i = 7; while ($i != "-") { x = $i; gsub(/[0-9]+/, "N", x); s = s " " x; i++ }
       print $5, $6, "[" s " ]", $(i+1), $(i+2), $(i+3) }' /proc/$$/mountinfo > $o/mounts
ip addr > $o/interfaces 2>&1 || true
# (unreadable for root's uid mapped into a user namespace, e.g. root without build users)
if cat /proc/net/dev > /tmp/netdev 2> /tmp/netdev.err; then awk 'NR > 2 { print $1 }' /tmp/netdev
else echo "unreadable: $(cat /tmp/netdev.err)"; fi > $o/netdev
rm -f /tmp/netdev /tmp/netdev.err
listing() {
  find "$1" -maxdepth 1 | sort | while read f; do
    # the link count of /proc counts every process of the host: not part of the sandbox's view
    if [ "$f" = /proc ]; then stat -c '%A - %U %G %s %t:%T %N' "$f"; else stat -c '%A %h %U %G %s %t:%T %N' "$f"; fi
  done
}
for d in / /dev /dev/pts /dev/shm /etc /nix /nix/store /build /tmp /opt /opt/dir /opt/link /srv /srv/x; do
  echo "== $d"; listing $d
done > $o/listings 2>&1
for f in /etc/*; do echo "== $f"; cat "$f"; done > $o/etc-contents 2>&1
for f in /opt/file /opt/dir/f /opt/link/f /srv/x/y/f; do echo "== $f"; cat "$f"; done > $o/bound-contents 2>&1
# expanded by the shell itself (no child process exists at that moment)
echo /proc/[0-9]* > $o/visible-pids
{ stat -c '%A %U %G' /proc/$$/fd/1 2>&1; } > $o/pty-owner
# the probe results a builder can gather itself
touch /tmp/p; { chmod 4755 /tmp/p && echo setuid-allowed || echo setuid-refused;
  chmod 2755 /tmp/p && echo setgid-allowed || echo setgid-refused;
  chmod 0755 /tmp/p && echo plain-allowed || echo plain-refused; } > $o/chmod 2>&1
echo complete > $o/complete
