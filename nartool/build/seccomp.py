"""The seccomp filter of the build sandbox, as a raw classic-BPF program.

The filter does what Nix's (libseccomp-made) filter does:

* ``chmod``/``fchmod``/``fchmodat`` with ``S_ISUID`` or ``S_ISGID`` in the mode fail with ``EPERM``
  (builders cannot create setuid/setgid files);
* ``setxattr``/``lsetxattr``/``fsetxattr`` fail with ``ENOTSUP`` (extended attributes cannot be
  represented in a NAR);
* everything else is allowed; a system call made through an ABI the filter does not know is killed
  (libseccomp's default for a foreign architecture).

On x86_64 the i386 and x32 ABIs are covered too, on aarch64 the 32-bit ARM ABI. ``fchmodat2``
(a newer system call that did not exist when Nix 2.8 was written) gets the same rule as
``fchmodat``, closing a hole later Nix releases also closed; a builder cannot observe the
difference otherwise.

:func:`filter_program` returns the program as bytes (``struct sock_filter`` array, native byte
order) so that the sandbox helper, which imports nothing of nartool, only has to install it.
"""

from __future__ import annotations

import errno
import functools
import os
import struct

# BPF instruction classes / fields
_LD, _JMP, _RET = 0x00, 0x05, 0x06
_W, _ABS = 0x00, 0x20
_JEQ, _JSET, _K = 0x10, 0x40, 0x00
_ALU, _AND = 0x04, 0x50

SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
X32_SYSCALL_BIT = 0x40000000

S_ISUID, S_ISGID = 0o4000, 0o2000

# offsets in struct seccomp_data
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i + (0 if struct.pack("=I", 1)[0] == 1 else 4)


#: per ABI: (audit arch, {syscall: number}) -- chmod-like calls map to the index of their mode
#: argument through _MODE_ARG
_ABIS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (AUDIT_ARCH_X86_64, {"chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
                                   "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190}),
    "x32": (AUDIT_ARCH_X86_64, {"chmod": X32_SYSCALL_BIT + 90, "fchmod": X32_SYSCALL_BIT + 91,
                                "fchmodat": X32_SYSCALL_BIT + 268, "fchmodat2": X32_SYSCALL_BIT + 452,
                                "setxattr": X32_SYSCALL_BIT + 188, "lsetxattr": X32_SYSCALL_BIT + 189,
                                "fsetxattr": X32_SYSCALL_BIT + 190}),
    "i386": (AUDIT_ARCH_I386, {"chmod": 15, "fchmod": 94, "fchmodat": 306, "fchmodat2": 452,
                               "setxattr": 226, "lsetxattr": 227, "fsetxattr": 228}),
    "aarch64": (AUDIT_ARCH_AARCH64, {"fchmod": 52, "fchmodat": 53, "fchmodat2": 452,
                                     "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7}),
    "arm": (AUDIT_ARCH_ARM, {"chmod": 15, "fchmod": 94, "fchmodat": 333, "fchmodat2": 452,
                             "setxattr": 226, "lsetxattr": 227, "fsetxattr": 228}),
}
_MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2}
_XATTR = ("setxattr", "lsetxattr", "fsetxattr")

#: the ABIs covered on each native machine (as ``platform.machine()`` names it)
NATIVE_ABIS = {"x86_64": ("x86_64", "i386", "x32"), "aarch64": ("aarch64", "arm")}


class _Asm:
    """A tiny assembler with forward labels (all jumps in this program go forward)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def stmt(self, code: int, k: int) -> None:
        self.ins.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: int | str, jf: int | str) -> None:
        self.ins.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def _off(self, t: int | str, pc: int) -> int:
        if isinstance(t, int):
            return t
        d = self.labels[t] - pc - 1
        if not 0 <= d <= 255:
            raise ValueError(f"BPF jump to {t} out of range")
        return d

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.ins):
            out += struct.pack("=HBBI", code, self._off(jt, pc), self._off(jf, pc), k & 0xFFFFFFFF)
        return bytes(out)


@functools.lru_cache(maxsize=8)
def filter_program(machine: str | None = None) -> bytes:
    """The BPF program for ``machine`` (default: this one). Raises ValueError for a machine
    without a known ABI table (the caller then decides, as Nix does, whether that is fatal)."""
    machine = machine or os.uname().machine  # (what platform.machine() reports, without importing it)
    abis = NATIVE_ABIS.get(machine)
    if abis is None:
        raise ValueError(f"seccomp filter: unsupported machine '{machine}'")
    a = _Asm()
    a.stmt(_LD | _W | _ABS, _OFF_ARCH)
    arches: list[int] = []
    for abi in abis:
        arch = _ABIS[abi][0]
        if arch not in arches:
            arches.append(arch)
    for arch in arches:
        a.jump(_JMP | _JEQ | _K, arch, f"arch_{arch:x}", 0)
    a.stmt(_RET | _K, SECCOMP_RET_KILL_THREAD)
    for arch in arches:
        a.label(f"arch_{arch:x}")
        a.stmt(_LD | _W | _ABS, _OFF_NR)
        same_arch = [abi for abi in abis if _ABIS[abi][0] == arch]
        # x86_64 and x32 share the audit arch: x32 numbers carry X32_SYSCALL_BIT
        for abi in same_arch:
            table = _ABIS[abi][1]
            for name, nr in table.items():
                if name in _XATTR:
                    a.jump(_JMP | _JEQ | _K, nr, "enotsup", 0)
                else:
                    a.jump(_JMP | _JEQ | _K, nr, f"mode{_MODE_ARG[name]}", 0)
        a.stmt(_RET | _K, SECCOMP_RET_ALLOW)
    for idx in sorted(set(_MODE_ARG.values())):
        a.label(f"mode{idx}")
        a.stmt(_LD | _W | _ABS, _arg_lo(idx))
        a.jump(_JMP | _JSET | _K, S_ISUID | S_ISGID, "eperm", 0)
        a.stmt(_RET | _K, SECCOMP_RET_ALLOW)
    a.label("eperm")
    a.stmt(_RET | _K, SECCOMP_RET_ERRNO | errno.EPERM)
    a.label("enotsup")
    a.stmt(_RET | _K, SECCOMP_RET_ERRNO | errno.ENOTSUP)
    return a.assemble()
