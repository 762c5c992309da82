"""``nartool nar hash`` and ``nartool nar restore`` without click, for their plain command lines.

Loading click and the command tree is ~25 ms of these commands' ~45 ms start-up (``nix-hash``
starts in ~15 ms), which scripts that hash or restore many small paths pay every time.
:func:`parse` recognises only the plain forms:

* ``nartool [--debug] nar hash [--base16|--base32|--sri] [--type ALGO] PATH``
* ``nartool [--debug] nar restore DEST [NAR]``

and answers ``None`` for everything else (``--help``, ``--case-hack``, ``--exclude``, ``--``, a
second format flag, an unknown algorithm, an argument starting with ``-``, a missing or extra
argument...): click then parses and reports it as before. The fast path never gives a usage
error of its own, and does what the click commands in :mod:`.nar` do, with the same output and
errors (:func:`.fastbuild.run_fast`).
"""

from __future__ import annotations

import sys

#: ``nar hash``'s format flags and its algorithms (as the click command declares them)
_FORMATS = {"--base16": "base16", "--base32": "base32", "--sri": "sri"}
_ALGOS = ("sha256", "sha512", "sha1", "md5")


class NarArgs:
    """A plain ``nar hash`` or ``nar restore`` command line, parsed."""

    __slots__ = ("command", "debug", "args", "fmt", "algo")

    def __init__(self, command: str, debug: bool) -> None:
        self.command = command
        self.debug = debug
        self.args: list[str] = []  # PATH, or DEST [NAR]
        self.fmt = "sri"
        self.algo = "sha256"


def parse(args: list[str]) -> NarArgs | None:
    """``args`` (the command line after ``nartool``) as a plain ``nar hash`` / ``nar restore``,
    or None when click should parse it."""
    debug = False
    i = 0
    while i < len(args) and args[i] == "--debug":
        debug = True
        i += 1
    if args[i:i + 1] != ["nar"] or i + 1 >= len(args) or args[i + 1] not in ("hash", "restore"):
        return None
    a = NarArgs(args[i + 1], debug)
    chose_format = False
    rest = args[i + 2:]
    j = 0
    while j < len(rest):
        t = rest[j]
        if not t.startswith("-"):
            a.args.append(t)
            j += 1
        elif a.command == "hash" and t in _FORMATS and not chose_format:
            a.fmt = _FORMATS[t]
            chose_format = True
            j += 1
        elif a.command == "hash" and (t == "--type" or t.startswith("--type=")):
            if t == "--type":
                if j + 1 >= len(rest):
                    return None
                algo, j = rest[j + 1], j + 2
            else:
                algo, j = t[len("--type="):], j + 1
            if algo not in _ALGOS:
                return None
            a.algo = algo
        else:
            return None
    if a.command == "hash" and len(a.args) != 1 or a.command == "restore" and len(a.args) not in (1, 2):
        return None
    return a


def main(a: NarArgs) -> None:
    """Run the command as :func:`.main.main` runs a command."""
    from .fastbuild import run_fast

    run_fast(lambda: _hash(a) if a.command == "hash" else _restore(a), a.debug)


def _names(path: str, *, restore: bool) -> object:
    """The name codec as :func:`.nar._names` chooses it without ``--case-hack`` (the
    environment, else a probe of the filesystem), with the same notice."""
    from ..fs.casehack import resolve

    codec, auto = resolve(None, path, restore=restore)
    if codec is not None and auto:
        sys.stderr.write("nartool: case-insensitive filesystem detected: using the case hack\n")
        sys.stderr.flush()
    return codec


def _hash(a: NarArgs) -> int:
    from .. import api

    path = a.args[0]
    h = api.hash_path(path, a.algo, names=_names(path, restore=False))  # type: ignore[arg-type]
    sys.stdout.write({"base16": h.base16, "base32": h.nix32, "sri": h.sri}[a.fmt] + "\n")
    return 0


def _restore(a: NarArgs) -> int:
    from .. import api

    dest = a.args[0]
    nar_file = a.args[1] if len(a.args) > 1 else "-"
    src = sys.stdin.buffer if nar_file == "-" else nar_file
    api.restore(dest, src, names=_names(dest, restore=True))  # type: ignore[arg-type]
    return 0
