"""``nartool nar …``: work on NAR archives."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import click

from .. import api
from ..compression import METHODS
from .common import held_stdout, refuse_binary_to_tty, stdout_bin, write_chunks
from .flags import chosen_mode, mode_flags

F = TypeVar("F", bound=Callable[..., Any])

case_hack_option = click.option(
    "--case-hack/--no-case-hack", "case_hack", default=None,
    help="Add/strip ~nix~case~hack~N suffixes for case-insensitive filesystems. "
         "Default: probe the filesystem (env NARTOOL_CASE_HACK=0|1 overrides).")


exclude_options = [
    click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
                 help="Leave out paths matching this gitignore-style pattern (repeatable)."),
    click.option("--exclude-from", "exclude_files", multiple=True, metavar="FILE",
                 type=click.Path(exists=True, dir_okay=False, path_type=str),
                 help="Read gitignore-style patterns from FILE (repeatable)."),
]


def with_excludes(f: F) -> F:
    for opt in reversed(exclude_options):
        f = opt(f)
    return f


def _exclude(excludes: tuple[str, ...], files: tuple[str, ...]) -> object:
    from ..fs.filters import exclude_filter

    return exclude_filter(excludes, files)


def _names(case_hack: bool | None, path: str, *, restore: bool) -> object:
    from ..fs.casehack import resolve

    codec, auto = resolve(case_hack, path, restore=restore)
    if codec is not None and auto:
        click.echo("nartool: case-insensitive filesystem detected: using the case hack", err=True)
    return codec


@click.group()
def nar() -> None:
    """Dump, restore, hash, list and extract NAR archives.

    Uncompressed output is byte-identical to `nix-store --dump`; inputs may be
    compressed (zstd, xz, bzip2, gzip: detected automatically) and come from files or pipes.
    """


@nar.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True, path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Write the NAR here (atomically) instead of to stdout.")
@click.option("--compress", type=click.Choice(METHODS), default="none", show_default=True,
              help="Compress the output.")
@case_hack_option
@with_excludes
@click.option("--list-xattrs", is_flag=True, help="Report files that carry extended attributes (on stderr).")
def dump(path: str, output: str | None, compress: str, case_hack: bool | None, excludes: tuple[str, ...],
         exclude_files: tuple[str, ...], list_xattrs: bool) -> None:
    """Serialise PATH (a file, symlink or directory tree) as a NAR.

    Symlinks are never followed. Only the owner-execute bit is recorded; extended
    attributes, owners and timestamps are not part of a NAR.

    Example: nartool nar dump ./src --exclude '*.o' --exclude 'build/' -o src.nar.zst --compress zstd
    """
    names = _names(case_hack, path, restore=False)
    exclude = _exclude(excludes, exclude_files)
    if list_xattrs:
        from ..fs.xattrs import files_with_xattrs

        for p, attrs in files_with_xattrs(path):
            click.echo(f"xattrs: {os.fsdecode(p)}: {', '.join(attrs)}", err=True)
    kw: dict[str, Any] = {"compress": compress, "names": names, "exclude": exclude}
    if output is None or output == "-":
        refuse_binary_to_tty("a NAR")
        api.dump(path, stdout_bin(), **kw)
    else:
        api.dump(path, output, **kw)


@nar.command()
@click.argument("dest", type=click.Path(path_type=str))
@click.argument("nar_file", metavar="[NAR]", required=False, default="-", type=click.Path(path_type=str))
@case_hack_option
def restore(dest: str, nar_file: str, case_hack: bool | None) -> None:
    """Restore a NAR (from the file NAR, or stdin when absent or '-') at DEST.

    DEST must not exist. The tree is built in a temporary sibling and renamed into place
    only when the whole NAR was read and found valid: a failed restore leaves nothing.
    """
    src = sys.stdin.buffer if nar_file == "-" else nar_file
    api.restore(dest, src, names=_names(case_hack, dest, restore=True))  # type: ignore[arg-type]


@nar.command(name="hash")
@click.argument("path", type=click.Path(path_type=str))
@mode_flags("hash-format", "hash format", [
    (("--base16",), "base16", "Hex, as `nix-hash --type sha256 PATH`."),
    (("--base32",), "base32", "Nix base-32, as `nix-hash --type sha256 --base32`."),
    (("--sri",), "sri", "SRI (`sha256-…`), as `nix hash path` [default]."),
])
@click.option("--type", "algo", type=click.Choice(["sha256", "sha512", "sha1", "md5"]), default="sha256",
              show_default=True, help="Hash algorithm.")
@case_hack_option
@with_excludes
@click.pass_context
def hash_(ctx: click.Context, path: str, algo: str, case_hack: bool | None, excludes: tuple[str, ...],
          exclude_files: tuple[str, ...]) -> None:
    """Print the hash of PATH's NAR serialisation (nothing is written). One format flag at most."""
    fmt = chosen_mode(ctx, "hash-format", "sri")
    h = api.hash_path(path, algo, names=_names(case_hack, path, restore=False),  # type: ignore[arg-type]
                      exclude=_exclude(excludes, exclude_files))  # type: ignore[arg-type]
    click.echo({"base16": h.base16, "base32": h.nix32, "sri": h.sri}[fmt])


def _open_nar(stack: ExitStack, nar_file: str) -> object:
    return sys.stdin.buffer if nar_file == "-" else nar_file


_PERM = {"regular": "-r--r--r--", "executable": "-r-xr-xr-x", "symlink": "lrwxrwxrwx", "directory": "dr-xr-xr-x"}


@nar.command(name="ls")
@click.argument("nar_file", metavar="NAR", type=click.Path(path_type=str))
@click.argument("path", default="/", required=False)
@click.option("-R", "--recursive", is_flag=True, help="List subdirectories too.")
@click.option("-l", "--long", "long_", is_flag=True, help="Show type, permissions and size.")
@click.option("-d", "--directory", is_flag=True, help="Show a directory itself, not its contents.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the listing in the JSON format of Nix binary caches' .ls files.")
def ls_(nar_file: str, path: str, recursive: bool, long_: bool, directory: bool, as_json: bool) -> None:
    """List the contents of NAR at PATH (default: the root) without restoring it.

    Output follows `nix nar ls` (names printed as they are, byte for byte). With --json, names
    that are not valid UTF-8 are written losslessly as \\udcXX escapes (see docs/names.md).
    The whole NAR is read and checked before anything is printed. NAR may be compressed; '-'
    reads stdin.
    """
    from ..nar import listing

    prefix = listing.split_path(path)
    if as_json and directory:
        raise click.UsageError("--directory does not go with --json")
    with ExitStack() as stack:
        events = api.read_events(_open_nar(stack, nar_file), stack)  # type: ignore[arg-type]
        print_listing(events, prefix, recursive=recursive, long_=long_, directory=directory, as_json=as_json)


def print_listing(events: Any, prefix: tuple[bytes, ...], *, recursive: bool, long_: bool, directory: bool,
                  as_json: bool) -> None:
    """The output of `nix nar ls` / `nix store ls` for the node at ``prefix``, printed only
    when the whole listing could be produced."""
    from ..nar import listing

    with held_stdout() as out:
        if as_json:
            for piece in listing.json_listing(events, prefix, recursive=recursive):
                out.write(piece.encode())
            out.write(b"\n")
            return
        for e in listing.entries(events, prefix, recursive=recursive, directory_itself=directory):
            rel = e.path[len(prefix):]
            if rel:
                name = b"./" + b"/".join(rel)
            elif e.type == "directory":
                name = b"."
            else:
                name = prefix[-1] if prefix else b""
            if long_:
                kind = "executable" if e.executable else e.type
                line = f"{_PERM[kind]} {e.size:20} ".encode() + name
                if e.type == "symlink":
                    line += b" -> " + e.target
            else:
                line = name
            out.write(line + b"\n")


@nar.command(name="cat")
@click.argument("nar_file", metavar="NAR", type=click.Path(path_type=str))
@click.argument("path")
def cat_(nar_file: str, path: str) -> None:
    """Write the contents of the regular file at PATH inside NAR to stdout.

    Nothing else is restored. NAR may be compressed, and '-' reads stdin. The whole NAR is
    still validated: a malformed archive exits non-zero even after the file was written.

    Example: nartool nar cat hello.nar /bin/hello > hello
    """
    from ..nar import listing

    with ExitStack() as stack:
        events = api.read_events(_open_nar(stack, nar_file), stack)  # type: ignore[arg-type]
        write_chunks(listing.cat(events, listing.split_path(path)), stdout_bin())


@nar.command(name="check")
@click.argument("source", metavar="NAR|PATH")
@click.option("--target", type=click.Choice(["macos", "linux"]), default="macos", show_default=True,
              help="Filesystem semantics to check against.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(source: str, target: str, as_json: bool) -> None:
    """List what a restore of NAR (or of the tree at PATH) on TARGET would have to work around.

    On macos (case-insensitive, normalisation-insensitive): every group of names that collide
    by case or Unicode normalisation, and names that would exceed 255 bytes once given a
    ~nix~case~hack~N suffix. Exit status 0: nothing found; 1: something found.

    Names are printed unambiguously, in double quotes (backslash and '"' escaped, control
    characters and bytes that are not UTF-8 as \\n, \\t, \\xNN; with --json, non-UTF-8 bytes
    as \\udcXX): see docs/names.md.
    """
    from ..fs.casehack import check_events
    from ..fs.source import dump_events
    from ..nar import listing

    with ExitStack() as stack:
        is_tree = source != "-" and (os.path.isdir(source) or os.path.islink(source)
                                     or (os.path.isfile(source) and not _looks_like_nar(source)))
        if is_tree:
            events = dump_events(source)
        else:
            events = api.read_events(_open_nar(stack, source), stack)  # type: ignore[arg-type]
        collisions, too_long = check_events(events, target)
    if as_json:
        out = listing.to_json({
            "target": target,
            "collisions": [{"directory": c["directory"], "names": c["names"]} for c in collisions],
            "tooLong": [{"path": t["path"], "length": t["length"]} for t in too_long],
        })
    else:
        lines = []
        q = listing.quoted_name
        for c in collisions:
            names = ", ".join(q(n) for n in c["names"])  # type: ignore[attr-defined]
            lines.append(f"collision in {q(c['directory'])}: {names}")  # type: ignore[arg-type]
        for t in too_long:
            lines.append(f"too long once suffixed ({t['length']} bytes): {q(t['path'])}")  # type: ignore[arg-type]
        out = "\n".join(lines)
    if out:
        click.echo(out)  # only names escaped as above: plain ASCII/UTF-8 text
    if not as_json and not collisions and not too_long:
        click.echo(f"no collisions on {target}", err=True)
    if collisions or too_long:
        raise SystemExit(1)


def _looks_like_nar(path: str) -> bool:
    from ..compression import detect
    from ..nar.format import TOK_MAGIC

    with open(path, "rb") as f:
        head = f.read(len(TOK_MAGIC))
    return head == TOK_MAGIC or detect(head) != "none"

