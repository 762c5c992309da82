"""Talking to other stores: Nix's serve protocol (``nix-store --serve``), copy-closure, transports.

* :mod:`.wire` — framing (u64 words, 32-bit checked ints, padded strings, path sets), bounded
  and strict, errors with offset and field;
* :mod:`.serve` — the server (``nartool serve [--write]``), wire-compatible with Nix 2.8, with
  per-user trust, group commit and a few harmless extensions (documented there);
* :mod:`.client` — :class:`~.client.ServeClient`, pipelined uploads and downloads;
* :mod:`.copy` — :func:`~.copy.copy_closure` (``nartool copy-closure --to/--from``);
* :mod:`.transport` — ssh (argv as Nix 2.8 builds it), local processes (``localhost``), and an
  in-process pipe for tests;
* :mod:`.testing` — synthetic store paths for tests and benchmarks.
"""
