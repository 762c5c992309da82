#!/bin/sh
# Install nartool from this checkout into a virtual environment of its own, then link its
# commands into a bin directory. Works as a normal user with the system Python, including
# Debian/Ubuntu/Homebrew Pythons that refuse `pip install` outside a venv (PEP 668).
#
#   sh install.sh                   venv in ${XDG_DATA_HOME:-~/.local/share}/nartool/venv,
#                                   links nartool and nartool-serve into ~/.local/bin
#   sh install.sh --venv DIR        use DIR for the venv
#   sh install.sh --bin DIR         link the commands into DIR (--no-link: don't link)
#   sh install.sh --extras test     also install the test tools (pytest, hypothesis, ruff, mypy, ...)
#   sh install.sh --no-signing      leave out the `signing` extra (the cryptography package, needed
#                                   only to sign and check signatures; installed by default)
#   sh install.sh --editable        install in editable (development) mode
#
# Environment: PYTHON (default python3). Re-running it upgrades the installation in place.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
venv=${XDG_DATA_HOME:-$HOME/.local/share}/nartool/venv
bindir=$HOME/.local/bin
signing=signing
extras=
editable=
link=1

while [ $# -gt 0 ]; do
    case $1 in
        --venv) venv=$2; shift 2 ;;
        --bin) bindir=$2; shift 2 ;;
        --no-link) link=; shift ;;
        --extras) extras="$extras,$2"; shift 2 ;;
        --no-signing) signing=; shift ;;
        --editable) editable=-e; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v "$py" >/dev/null 2>&1; then
    echo "install.sh: $py not found; nartool needs Python >= 3.10 (set PYTHON=...)" >&2
    exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "install.sh: nartool needs Python >= 3.10; $py is $("$py" -V 2>&1)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
        # Debian's python3 without python3-venv has no ensurepip: a venv without its own pip
        # can still use the system's pip module, which installs into the venv.
        rm -rf "$venv"
        if "$py" -m pip --version >/dev/null 2>&1; then
            "$py" -m venv --without-pip --system-site-packages "$venv"
        else
            echo "install.sh: cannot create a virtual environment: $py has neither ensurepip nor pip." >&2
            echo "  Debian/Ubuntu: sudo apt-get install python3-venv   (or: pipx install $here)" >&2
            exit 1
        fi
    fi
fi

# extras: `signing` (unless --no-signing) plus any --extras, as "[signing,test]"
extras=$(printf '%s' "$signing$extras" | sed 's/^,//')
[ -n "$extras" ] && extras="[$extras]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade $editable "$here$extras"

if [ -n "$link" ]; then
    mkdir -p "$bindir"
    for cmd in nartool nartool-serve; do
        ln -sf "$venv/bin/$cmd" "$bindir/$cmd"
    done
    echo "installed: $bindir/nartool, $bindir/nartool-serve (venv: $venv)" >&2
    case ":$PATH:" in
        *":$bindir:"*) ;;
        *) echo "note: $bindir is not on PATH; add it, or call $bindir/nartool directly" >&2 ;;
    esac
else
    echo "installed: $venv/bin/nartool, $venv/bin/nartool-serve" >&2
fi
