"""``nartool key …``: create and inspect Nix-compatible Ed25519 signing keys."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..errors import NartoolError
from ..store.signing import SecretKey
from .common import echo_json


@click.group()
def key() -> None:
    """Create and inspect signing keys (the formats of Nix's binary-cache keys).

    A secret key is `NAME:base64(64 bytes)`, a public key `NAME:base64(32 bytes)`;
    both interoperate with `nix-store --generate-binary-cache-key`, `nix store sign`
    and `trusted-public-keys`.
    """


def _write_new(path: str, text: str, mode: int) -> None:
    """Create ``path`` (never replacing a file) holding ``text``, without a trailing newline."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(path)
        raise


def _refuse_existing(*paths: str | None) -> None:
    for p in paths:
        if p is not None and os.path.lexists(p):
            raise NartoolError("refusing to overwrite an existing file", path=p, rule="file-exists")


def _write_key_files(sk: SecretKey, secret_file: str | None, public_file: str | None) -> None:
    """Write the requested files: all of them or (on error) none."""
    if secret_file is not None and public_file is not None and \
            os.path.abspath(secret_file) == os.path.abspath(public_file):
        raise click.UsageError("--secret-file and --public-file must be different files")
    _refuse_existing(secret_file, public_file)
    written: list[str] = []
    try:
        if secret_file is not None:
            _write_new(secret_file, sk.to_text(), 0o600)  # as under Nix's umask 077
            written.append(secret_file)
        if public_file is not None:
            _write_new(public_file, sk.public_key().to_text(), 0o666)
            written.append(public_file)
    except BaseException:
        for p in written:
            os.unlink(p)
        raise


@key.command()
@click.argument("name")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Write the secret key to FILE (created with mode 0600; never overwritten).")
@click.option("--public-file", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Write the public key to FILE (never overwritten).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object: name, publicKey, and secretKey unless written to a file "
                   "(then secretFile; publicFile when written).")
def generate(name: str, secret_file: str | None, public_file: str | None, as_json: bool) -> None:
    """Generate a new Ed25519 key pair called NAME.

    With both file options this does what `nix-store --generate-binary-cache-key NAME
    SECRETFILE PUBLICFILE` does (files without a trailing newline). Keys not written to a
    file are printed: the secret key on the first line, then the public key. Convention:
    NAME is a host or cache name plus a number, e.g. `cache.example.org-1`.

    \b
    Examples:
      nartool key generate my-cache-1 --secret-file my-cache-1.sec --public-file my-cache-1.pub
      nartool key generate my-cache-1 --secret-file my-cache-1.sec   # prints the public key
    """
    sk = SecretKey.generate(name)
    _write_key_files(sk, secret_file, public_file)
    pub = sk.public_key().to_text()
    if as_json:
        obj: dict[str, Any] = {"name": sk.name, "publicKey": pub}
        if secret_file is None:
            obj["secretKey"] = sk.to_text()
        else:
            obj["secretFile"] = secret_file
        if public_file is not None:
            obj["publicFile"] = public_file
        echo_json(obj)
        return
    if secret_file is None:
        click.echo(sk.to_text())
    if public_file is None:
        click.echo(pub)


@key.command()
@click.argument("secret_file", metavar="SECRETFILE", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with name and publicKey.")
def public(secret_file: str, as_json: bool) -> None:
    """Print the public key of the secret key in SECRETFILE ('-' reads stdin).

    Like `nix key convert-secret-to-public`; the output goes into `trusted-public-keys`.
    """
    from ..store.signing import load_secret_key

    if secret_file == "-":
        try:
            sk = SecretKey.parse(sys.stdin.buffer.read().decode("ascii"))
        except UnicodeDecodeError:
            raise NartoolError("secret key is not ASCII", rule="bad-key", path="<stdin>") from None
    else:
        sk = load_secret_key(secret_file)
    pub = sk.public_key().to_text()
    if as_json:
        echo_json({"name": sk.name, "publicKey": pub})
    else:
        click.echo(pub)
