"""``nartool store …``: a Nix-compatible store (the global ``--store ROOT`` chooses it)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from typing import Any

import click

from ..nar import listing
from .common import (
    ByteProgress,
    echo_json,
    open_store,
    refuse_binary_to_tty,
    stdout_bin,
    write_chunks,
)
from .flags import chosen_mode, mode_flags
from .progress import TotalProgress


@click.group()
@click.option("--case-hack/--no-case-hack", "case_hack", default=None,
              help="Store case-colliding names with ~nix~case~hack~N suffixes (for case-insensitive "
                   "filesystems). Chosen when the store is created (default: probe its filesystem) and "
                   "remembered; an existing store must match.")
@click.pass_context
def store(ctx: click.Context, case_hack: bool | None) -> None:
    """Add, query, export/import, verify and garbage-collect store paths.

    The store lives at the global `--store ROOT` (env NARTOOL_STORE; default: an embedded
    store in the user's data directory, created on first use) in the layout of
    `nix-store --store ROOT`: real Nix can use it too. Store paths are printed with the
    logical store dir (`--store-dir`, default /nix/store).
    """
    ctx.meta["nartool.store_case_hack"] = case_hack


def _info_json(info: Any) -> dict[str, Any]:
    """A path info shaped as `nix path-info --json` (Nix 2.8) shapes it: keys in its order, the
    NAR hash in SRI form, and keys without a value (no deriver, not ultimate, no signatures, no
    content address, registration time 0) left out."""
    d: dict[str, Any] = {"path": info.path, "narHash": info.nar_hash.sri, "narSize": info.nar_size,
                         "references": sorted(info.references)}
    if info.ca:
        d["ca"] = info.ca
    if info.deriver:
        d["deriver"] = info.deriver
    if info.registration_time:
        d["registrationTime"] = info.registration_time
    if info.ultimate:
        d["ultimate"] = True
    if info.sigs:
        d["signatures"] = sorted(info.sigs)
    return d


def _paths(st: Any, args: Iterable[str]) -> list[str]:
    return [st.follow(a) for a in args]


@store.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False, path_type=str))
@click.option("--name", help="Store path name (default: the base name of PATH; only with one PATH).")
@click.option("--flat", is_flag=True, help="Hash the file's bytes, not its NAR (as `nix-store --add-fixed sha256`).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN", help="gitignore-style pattern to leave out.")
@click.option("--scan-references", is_flag=True,
              help="Record as references the valid store paths whose hash parts occur in the tree "
                   "(Nix's reference scanning); the store path then depends on them.")
@click.option("--json", "as_json", is_flag=True, help="Print path infos as JSON.")
@click.pass_context
def add(ctx: click.Context, paths: tuple[str, ...], name: str | None, flat: bool, excludes: tuple[str, ...],
        scan_references: bool, as_json: bool) -> None:
    """Copy PATHs into the store and print their store paths (idempotent).

    The store path equals `nix-store --add PATH` (or `--add-fixed sha256` with --flat). A source
    on a case-insensitive filesystem is read through the case hack (NARTOOL_CASE_HACK=0|1 overrides).
    """

    if name and len(paths) > 1:
        raise click.UsageError("--name goes with a single PATH")
    st = open_store(ctx)
    out = []
    prog = TotalProgress("adding", sum(_tree_size(p) for p in paths) if sys.stderr.isatty() else 0)
    with prog.watch_reads(), st.batch():  # one sync and one transaction for all of them
        for p in paths:
            out.append(_add_one(st, p, name, flat, excludes, scan_references))
    for info in out:
        if not as_json:
            click.echo(info.path)
    if as_json:
        echo_json([_info_json(i) for i in out])


def _tree_size(path: str) -> int:
    """Bytes of the regular files at or below ``path`` (symlinks not followed): the total a
    progress line counts towards. Unreadable parts count as nothing."""
    total = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size if os.path.isfile(path) and not os.path.islink(path) else 0
    for top, _dirs, files in os.walk(path):
        for f in files:
            try:
                fst = os.lstat(os.path.join(top, f))
            except OSError:
                continue
            if stat.S_ISREG(fst.st_mode):
                total += fst.st_size
    return total


def _add_one(st: Any, p: str, name: str | None, flat: bool, excludes: tuple[str, ...],
             scan_references: bool) -> Any:
    from ..fs.casehack import resolve
    from ..fs.filters import exclude_filter

    codec, _ = resolve(None, p, restore=False)
    ex = exclude_filter(excludes, ()) if excludes else None
    return st.add_path(p, name=name, flat=flat, names=codec, exclude=ex, scan_references=scan_references)


@store.command()
@click.argument("path")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), help="Write here instead of stdout.")
@click.option("--compress", type=click.Choice(["none", "zstd", "xz", "bzip2", "gzip"]), default="none",
              show_default=True)
@click.pass_context
def dump(ctx: click.Context, path: str, output: str | None, compress: str) -> None:
    """Write the NAR of a store path (checked against its registered hash).

    PATH may lead inside a store path (`/nix/store/…-pkg/share/doc`): then the NAR of that
    file or directory is written, as `nix-store --dump PATH` does (symlinks on the way are
    followed, within the store; the whole store path is still checked against its hash)."""
    from ..compression import compressor

    st = open_store(ctx)
    sp, sub = resolve_store_path(st, path)
    chunks = st.nar_chunks(sp) if not sub else _sub_nar(st, sp, sub)
    _in_store(path, lambda: _emit(compressor(chunks, compress) if compress != "none" else chunks, output, "a NAR"))


def _split_store_arg(st: Any, arg: str) -> tuple[str, tuple[bytes, ...]]:
    """(store path, components inside it) of a user argument: a store path, a path inside one
    (in the logical or the physical store directory), or a path through a symlink into the
    store (`result/bin/hello`)."""
    real = getattr(st, "real_store_dir", st.store_dir)
    if not any(arg.startswith(d + "/") for d in (st.store_dir, real)):
        parts = arg.split("/")
        for k in range(len(parts), 0, -1):  # the longest leading part that is a symlink
            lead = "/".join(parts[:k])
            if lead and os.path.islink(lead):
                target = os.path.join(os.path.dirname(lead), os.readlink(lead))
                rest = "/".join(parts[k:])
                arg = os.path.normpath(target) + ("/" + rest if rest else "")
                break
    sp = st.follow(arg)
    for d in (st.store_dir, real):
        if arg.startswith(d + "/"):
            rest = arg[len(d) + 1:].partition("/")[2]
            return sp, listing.split_path(rest)
    return sp, ()


_MAX_LINKS = 40  # as the kernel's ELOOP limit


def resolve_store_path(st: Any, arg: str) -> tuple[str, tuple[bytes, ...]]:
    """(store path, components inside it) naming what ``arg`` names, as Nix's store accessor
    sees it: symlinks among the leading components are followed (relative ones inside the
    store path or on into another one, absolute ones only into the store directory); the last
    component is not followed (unless a '/' ends ``arg``). Errors name ``arg`` as Nix does
    ("path '…' does not exist")."""
    from ..errors import NartoolError
    from ..nar.events import Symlink, with_paths

    sp, sub = _split_store_arg(st, arg)
    last = 1 if arg.endswith("/") else 0  # a trailing slash follows the last symlink too, as POSIX
    for _ in range(_MAX_LINKS):
        link: tuple[int, bytes] | None = None
        if len(sub) + last > 1:
            for path, ev in with_paths(st.nar_events(sp)):
                if isinstance(ev, Symlink) and 0 < len(path) < len(sub) + last and sub[:len(path)] == path:
                    link = len(path), ev.target
                    break
        if link is None:
            return sp, sub
        k, target = link
        if target.startswith(b"/"):
            joined = os.fsdecode(target)
        else:
            joined = sp + "/" + os.fsdecode(b"/".join((*sub[:k - 1], target)))
        joined = os.path.normpath(joined + "/" + os.fsdecode(b"/".join(sub[k:])))
        if not joined.startswith(st.store_dir + "/"):
            raise NartoolError(f"path '{arg}' leads outside the store (symlink "
                               f"'{sp}/{os.fsdecode(b'/'.join(sub[:k]))}' -> '{os.fsdecode(target)}')",
                               rule="outside-store")
        sp, sub = _split_store_arg(st, joined)
    raise NartoolError(f"path '{arg}': too many levels of symbolic links", rule="symlink-loop")


def _in_store(arg: str, run: Any) -> Any:
    """Run ``run()``, giving listing errors Nix's wording for store paths."""
    from ..errors import NartoolError
    from ..nar.listing import PathNotFound

    try:
        return run()
    except PathNotFound:
        raise NartoolError(f"path '{arg}' does not exist", rule="not-found") from None
    except NartoolError as e:
        if e.rule == "not-a-file":
            raise NartoolError(f"path '{arg}' is not a regular file", rule="not-a-file") from None
        raise


def _sub_nar(st: Any, sp: str, sub: tuple[bytes, ...]) -> Iterable[bytes | bytearray | memoryview]:
    """The NAR of the node at ``sub`` in store path ``sp``, cut from the store path's checked NAR
    (so a damaged store path fails here too, at the end)."""
    from ..nar.events import Directory, File, Symlink, with_paths
    from ..nar.listing import PathNotFound, show_path
    from ..nar.reader import NarReader
    from ..nar.writer import write_nar

    chunks = iter(st.nar_chunks(sp))
    buf = bytearray()

    def read(n: int) -> bytes:
        while len(buf) < n:
            c = next(chunks, None)
            if c is None:
                break
            buf.extend(c)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def cut() -> Iterable[Any]:
        n = len(sub)
        found = False
        for path, ev in with_paths(NarReader(read).events()):
            if path[:n] != sub:
                continue
            if len(path) == n and not found:
                found = True
                if isinstance(ev, Directory):
                    ev = Directory(b"")
                elif isinstance(ev, File):
                    ev = File(b"", ev.executable, ev.size, ev.chunks, ev.offset)
                elif isinstance(ev, Symlink):
                    ev = Symlink(b"", ev.target)
            yield ev
        if not found:
            raise PathNotFound("path not found in NAR", path=show_path(sub), rule="not-found")
        for _ in chunks:  # the rest, so that the store path's hash is checked
            pass

    return write_nar(cut())


def _emit(chunks: Iterable[bytes | bytearray | memoryview], output: str | None, what: str) -> None:
    if output is None or output == "-":
        refuse_binary_to_tty(what)
        write_chunks(chunks, stdout_bin())
        return
    from ..fs.osutil import output_file

    with output_file(output, fsync=True) as f:
        write_chunks(chunks, f)


@store.command(name="ls")
@click.argument("path")
@click.argument("subpath", default="/", required=False)
@click.option("-R", "--recursive", is_flag=True, help="List subdirectories too.")
@click.option("-l", "--long", "long_", is_flag=True, help="Show type, permissions and size.")
@click.option("-d", "--directory", is_flag=True, help="Show a directory itself, not its contents.")
@click.option("--json", "as_json", is_flag=True, help="The JSON listing format of binary caches (.ls).")
@click.pass_context
def ls_(ctx: click.Context, path: str, subpath: str, recursive: bool, long_: bool, directory: bool,
        as_json: bool) -> None:
    """List the contents of a store path, or of a path inside one (as `nix store ls`).

    PATH may lead inside a store path (`/nix/store/…-pkg/share`); SUBPATH, if given, is
    appended. Symlinks on the way are followed (within the store), the last one is not.
    Names are printed as they are; with --json, names that are not valid UTF-8 are written
    losslessly as \\udcXX escapes (see docs/names.md). Nothing is printed unless the whole
    path could be read."""
    from .nar import print_listing

    if as_json and directory:
        raise click.UsageError("--directory does not go with --json")
    st = open_store(ctx)
    arg = path.rstrip("/") + "/" + subpath.lstrip("/") if subpath.strip("/") else path
    sp, sub = resolve_store_path(st, arg)
    _in_store(arg, lambda: print_listing(st.nar_events(sp), sub, recursive=recursive, long_=long_,
                                         directory=directory, as_json=as_json))


@store.command(name="cat")
@click.argument("path")
@click.argument("subpath", default="/", required=False)
@click.pass_context
def cat_(ctx: click.Context, path: str, subpath: str) -> None:
    """Write a file inside a store path to stdout (as `nix store cat`).

    PATH is the file (`/nix/store/…-pkg/etc/motd`), or a store path with the file's SUBPATH
    inside it. Symlinks on the way are followed (within the store), the last one is not."""
    st = open_store(ctx)
    arg = path.rstrip("/") + "/" + subpath.lstrip("/") if subpath.strip("/") else path
    sp, sub = resolve_store_path(st, arg)
    _in_store(arg, lambda: write_chunks(listing.cat(st.nar_events(sp), sub), stdout_bin()))


@store.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), help="Write here instead of stdout.")
@click.option("-r", "--closure", is_flag=True, help="Export the paths' whole closure.")
@click.option("--compress", type=click.Choice(["none", "zstd", "xz", "bzip2", "gzip"]), default="none",
              show_default=True)
@click.pass_context
def export(ctx: click.Context, paths: tuple[str, ...], output: str | None, closure: bool, compress: str) -> None:
    """Write PATHs in `nix-store --export` format (dependency order), for `store import`
    or `nix-store --import`.

    Example (archive a closure): nartool store export -r /nix/store/…-app --compress zstd -o app.closure.zst
    """
    from ..compression import compressor

    st = open_store(ctx)
    ps = _paths(st, paths)
    if closure:
        ps = st.closure(ps)
    total = sum(st.path_info(p).nar_size for p in ps) if sys.stderr.isatty() else 0
    chunks = TotalProgress("exporting", total).chunks(st.export_paths(ps))
    _emit(compressor(chunks, compress) if compress != "none" else chunks, output, "an export stream")


@store.command(name="import")
@click.argument("file", default="-", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the imported paths as a JSON list.")
@click.pass_context
def import_(ctx: click.Context, file: str, as_json: bool) -> None:
    """Import a `nix-store --export` stream (FILE or stdin; compression detected), all or nothing.

    Every NAR is checked; references must be valid or come earlier in the stream. Several
    streams one after the other (e.g. `cat a.export b.export`) are imported together, as one
    batch; anything after the last stream that is not a complete export stream is refused and
    nothing is imported.
    """
    from ..compression import open_decompressed

    st = open_store(ctx)
    f = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
    try:
        read, _ = open_decompressed(f)
        prog = ByteProgress("importing")
        paths = import_streams(st, prog.reader(read))
        prog.done()
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if as_json:
        echo_json(paths)
    else:
        for p in paths:
            click.echo(p)


def import_streams(st: Any, read: Any) -> list[str]:
    """Import every export stream in ``read`` (a ``read(n)`` callable), one after the other,
    in one batch: all or nothing. ``LocalStore.import_paths`` stops at the end marker of the
    first stream (in the serve protocol the next command follows it); here the input must end
    right after a stream's end marker, so concatenated streams are not cut short and trailing
    bytes are refused."""
    from ..errors import NartoolError
    from ..nar.source import as_source

    src = as_source(read, "export stream")
    paths: list[str] = []
    with st.batch():
        n = 0
        while True:
            n += 1
            start = src.offset
            try:
                paths.extend(st.import_paths(src))
            except NartoolError as e:
                if n > 1:  # offsets from the start of the whole input, and which stream it was
                    if not e.offset:
                        e.message = f"data after export stream {n - 1} is not an export stream: {e.message}"
                    else:
                        e.message = f"in export stream {n} (from byte {start}): {e.message}"
                    e.offset = start + (e.offset or 0)
                raise
            if src.at_eof():
                return paths


@store.command()
@click.argument("paths", nargs=-1, required=True)
@mode_flags("query", "query type", [
    (("--references",), "references", "Direct references."),
    (("--referrers",), "referrers", "Direct referrers."),
    (("--requisites", "-R"), "requisites", "The closure."),
    (("--referrers-closure",), "referrers-closure", "Everything referring to PATHs."),
    (("--tree",), "tree", "The closure as a tree."),
    (("--graph",), "graph", "The closure as a Graphviz graph."),
    (("--size",), "size", "NAR size."),
    (("--closure-size",), "closure-size", "Total NAR size of the closure."),
    (("--hash",), "hash", "NAR hash (sha256:nix32)."),
    (("--deriver",), "deriver", "The deriver (or 'unknown-deriver')."),
    (("--info",), "info", "Everything about each path [default]."),
])
@click.option("--include-outputs", is_flag=True, help="With --requisites: add the outputs of derivations.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def query(ctx: click.Context, paths: tuple[str, ...], include_outputs: bool, as_json: bool) -> None:
    """Query store paths, as `nix-store --query` (one query type; two different ones are refused)."""
    what = chosen_mode(ctx, "query", "info")
    st = open_store(ctx)
    ps = _paths(st, paths)
    for p in ps:
        st.path_info(p)  # valid?
    result: Any
    if what == "references":
        result = sorted({r for p in ps for r in st.query_references(p)})
    elif what == "referrers":
        result = sorted({r for p in ps for r in st.query_referrers(p)})
    elif what == "requisites":
        result = st.closure(ps, include_outputs=include_outputs)
    elif what == "referrers-closure":
        result = sorted(st.referrers_closure(ps))
    elif what in ("size", "hash", "deriver"):
        infos = [st.path_info(p) for p in ps]
        if what == "size":
            result = [i.nar_size for i in infos]
        elif what == "hash":
            result = [i.nar_hash.prefixed("nix32") for i in infos]
        else:
            result = [i.deriver or "unknown-deriver" for i in infos]
        if as_json:
            echo_json(dict(zip(ps, result, strict=True)))
            return
    elif what == "closure-size":
        result = sum(st.path_info(p).nar_size for p in st.closure(ps))
    elif what == "tree":
        _tree(st, ps)
        return
    elif what == "graph":
        _graph(st, ps)
        return
    else:
        infos = [st.path_info(p) for p in ps]
        if as_json:
            echo_json([_info_json(i) for i in infos])
        else:
            for i in infos:
                d = _info_json(i)
                click.echo(i.path)
                for k in ("narHash", "narSize", "deriver", "ca", "registrationTime"):
                    if k in d:
                        click.echo(f"  {k}: {d[k]}")
                for r in d["references"]:
                    click.echo(f"  reference: {r}")
                for s in d.get("signatures", ()):
                    click.echo(f"  signature: {s}")
        return
    if as_json:
        echo_json(result)
    elif isinstance(result, list):
        for r in result:
            click.echo(r)
    else:
        click.echo(result)


def _topo_children(st: Any, items: set[str]) -> list[str]:
    """Nix's ``topoSortPaths(items)`` reversed: a depth-first post-order over the references
    within ``items`` (items and references visited in sorted order), so a path comes after
    everything it refers to."""
    out: list[str] = []
    visited: set[str] = set()
    for start in sorted(items):
        if start in visited:
            continue
        visited.add(start)
        stack = [(start, iter(sorted(st.query_references(start))))]
        while stack:
            node, it = stack[-1]
            for r in it:
                if r != node and r in items and r not in visited:
                    visited.add(r)
                    stack.append((r, iter(sorted(st.query_references(r)))))
                    break
            else:
                stack.pop()
                out.append(node)
    return out


def _tree(st: Any, paths: list[str]) -> None:
    """`nix-store -q --tree`, byte for byte: children in Nix's order (each after the siblings it refers to), a
    path met again printed with ' [...]' and not expanded (a self-reference too)."""
    done: set[str] = set()
    out = sys.stdout

    todo: list[tuple[str, str, str]] = [(p, "", "") for p in reversed(paths)]
    while todo:
        p, first, rest = todo.pop()
        if p in done:
            out.write(f"{first}{p} [...]\n")
            continue
        done.add(p)
        out.write(f"{first}{p}\n")
        children = _topo_children(st, set(st.query_references(p)))
        for k in range(len(children) - 1, -1, -1):  # pushed in reverse: printed in order
            last = k == len(children) - 1
            todo.append((children[k], rest + ("└───" if last else "├───"), rest + ("    " if last else "│   ")))
    out.flush()


def _graph(st: Any, paths: list[str]) -> None:
    click.echo("digraph G {")
    for p in st.closure(paths):
        base = p.rsplit("/", 1)[-1]
        click.echo(f'"{base}" [label = "{base[33:]}", shape = box, style = filled, fillcolor = "#ffffff"];')
        for r in sorted(st.query_references(p) - {p}):
            click.echo(f'"{r.rsplit("/", 1)[-1]}" -> "{base}" [color = "black"];')
    click.echo("}")


@store.command()
@click.option("--check-contents", is_flag=True, help="Re-hash every path and compare with the database.")
@click.option("--repair", is_flag=True,
              help="Invalidate (and delete what is left of) each missing or corrupt path that nothing needs: "
                   "no valid path refers to it and no GC root (permanent, indirect, temp or runtime) holds it. "
                   "Other broken paths are reported as not repairable and kept; intact paths are never touched.")
@click.option("--sigs", is_flag=True, help="Also report paths without a valid signature from trusted-public-keys "
                                           "(content-addressed paths need none).")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@click.pass_context
def verify(ctx: click.Context, check_contents: bool, repair: bool, sigs: bool, as_json: bool) -> None:
    """Check that every registered path exists (and, with --check-contents, is intact).

    Problems: missing, corrupt (NAR hash or size changed), unverifiable (contents could not be
    read; never treated as corruption). Exit status 1 when a problem remains: anything but a
    broken path that --repair invalidated.
    """
    st = open_store(ctx)
    total = 0
    if check_contents and sys.stderr.isatty():
        total = sum(i.nar_size for i in (st.query_path_info(p) for p in st.all_paths()) if i is not None)
    with TotalProgress("verifying", total).watch_reads():
        problems = st.verify(check_contents=check_contents, repair=repair)
    if sigs:
        from ..config import Config
        from ..store.paths import ca_matches
        from ..store.signing import verify_path_info

        keys = Config.load().trusted_keys()
        for p in st.all_paths():
            info = st.path_info(p)
            if not ca_matches(p, info.ca, info.references, st.store_dir) and not verify_path_info(info, keys):
                problems.append({"path": p, "problem": "no valid signature"})
    if as_json:
        echo_json(problems)
    else:
        for pr in problems:
            line = f"{pr['problem']}: {pr['path']}" + (f" ({pr['detail']})" if pr.get("detail") else "")
            if pr.get("repair") == "not repairable":
                line += f"; not repairable, kept: {pr.get('reason', '')}"
            elif pr.get("repair"):
                line += f"; {pr['repair']}"
            click.echo(line, err=True)
    if any(p.get("repair") not in ("invalidated", "already invalid") for p in problems):
        raise SystemExit(1)


class SizeType(click.ParamType):  # type: ignore[type-arg]  # (generic only from click 8.2)
    """A byte count with an optional K/M/G/T suffix (powers of 1024, either case), as Nix's
    ``--max-freed`` takes it."""

    name = "size"
    _UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        mult = 1
        if text and text[-1].isalpha():
            unit = text[-1].upper()
            if unit not in self._UNITS:
                self.fail(f"invalid unit specifier '{text[-1]}' in {value!r} (K, M, G or T)", param, ctx)
            mult = self._UNITS[unit]
            text = text[:-1]
        if not text.isdigit():
            self.fail(f"{value!r} is not a size (a number of bytes, optionally with K, M, G or T)", param, ctx)
        return int(text) * mult


@store.command(name="add-root")
@click.argument("link", type=click.Path(path_type=str))
@click.argument("path")
@click.pass_context
def add_root(ctx: click.Context, link: str, path: str) -> None:
    """Make LINK a symlink to PATH and register it as an (indirect) GC root, like
    `nix-store --add-root LINK --indirect -r PATH`. Removing LINK drops the root."""
    from ..store.gc import add_indirect_root

    st = open_store(ctx)
    add_indirect_root(st, link, st.follow(path))
    click.echo(os.path.abspath(link))


@store.command()
@mode_flags("gc", "gc action", [
    (("--print-roots",), "print-roots", "List the roots as 'LINK -> PATH'."),
    (("--print-live",), "print-live", "List live paths, delete nothing."),
    (("--print-dead",), "print-dead", "List dead paths, delete nothing."),
])
@click.option("--max-freed", type=SizeType(), metavar="SIZE",
              help="Stop after freeing this many bytes; a K, M, G or T suffix multiplies by 1024, "
                   "1024², … (as Nix's --max-freed 1G).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_context
def gc(ctx: click.Context, max_freed: int | None, as_json: bool) -> None:
    """Delete every path not reachable from a GC root (symlinks or files named after store
    paths under ROOT/nix/var/nix/gcroots and profiles, temporary roots of running processes)."""
    action: str | None = chosen_mode(ctx, "gc", "") or None
    from ..store.gc import collect_garbage, find_roots

    st = open_store(ctx)
    if action == "print-roots":
        r = find_roots(st)
        if as_json:
            echo_json({"roots": r.roots, "problems": r.problems})
            return
        for where, p in sorted(r.roots.items()):
            click.echo(f"{where} -> {p}")
        for pr in r.problems:
            click.echo(f"warning: {pr}", err=True)
        return
    res = collect_garbage(st, action=action or "delete", max_freed=max_freed,
                          on_delete=None if as_json else (lambda p: click.echo(f"deleting '{p}'", err=True)))
    for pr in res.problems:
        click.echo(f"warning: {pr}", err=True)
    if action == "print-live":
        items: list[str] = sorted(res.live)
    elif action == "print-dead":
        items = sorted(res.dead)
    else:
        items = res.deleted
    if as_json:
        echo_json({"paths": items, "bytesFreed": res.bytes_freed, "seconds": round(res.seconds, 3),
                   "problems": res.problems})
    elif action in ("print-live", "print-dead"):
        for p in items:
            click.echo(p)
    else:
        click.echo(f"{len(res.deleted)} store paths deleted, {res.bytes_freed / 1048576:.2f} MiB freed")


@store.command()
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def delete(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """Delete PATHs; refused (nothing deleted) if any is alive or referenced by a path outside the set."""
    from ..store.gc import collect_garbage

    st = open_store(ctx)
    res = collect_garbage(st, paths=_paths(st, paths))
    for p in res.deleted:
        click.echo(f"deleting '{p}'", err=True)
    click.echo(f"{len(res.deleted)} store paths deleted, {res.bytes_freed / 1048576:.2f} MiB freed")


@store.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Secret key file (from `nartool key generate` or `nix-store --generate-binary-cache-key`).")
@click.option("-r", "--closure", is_flag=True, help="Sign the whole closure.")
@click.pass_context
def sign(ctx: click.Context, paths: tuple[str, ...], key_file: str, closure: bool) -> None:
    """Add an ed25519 signature to PATHs (Nix's format, as `nix store sign`)."""
    from ..store.signing import load_secret_key, sign_path_info

    key = load_secret_key(key_file)
    st = open_store(ctx)
    ps = _paths(st, paths)
    if closure:
        ps = st.closure(ps)
    n = 0
    for p in ps:
        info = st.path_info(p)
        sig = sign_path_info(info, key)
        if sig not in info.sigs:
            st.add_signatures(p, [sig])
            n += 1
    click.echo(f"added {n} signatures", err=True)


def _add_log_command() -> None:
    from .build import store_log

    store.add_command(store_log, "log")


_add_log_command()
