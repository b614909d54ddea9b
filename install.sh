#!/bin/sh
# edgeserve installer. `./install.sh --dev` makes a development setup in ./.venv.
# (The box install with systemd comes with the packaging work; see packaging/.)
set -eu

usage() {
    cat <<'USAGE'
Usage: ./install.sh --dev
  --dev    create ./.venv with edgeserve and its test tools (idempotent)
  --help   show this help
USAGE
}

die() { echo "install.sh: $*" >&2; exit 1; }

mode=""
for arg in "$@"; do
    case "$arg" in
        --dev) mode=dev ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
[ "$mode" = dev ] || { usage >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "python3 not found; install Python 3.10 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python 3.10 or newer is needed, found $("$python" -V 2>&1)"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "the Python venv module is missing (Debian: apt-get install python3-venv)"

venv="$here/.venv"
stamp="$venv/.edgeserve-installed"
want=$(cat "$here/pyproject.toml" | cksum)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "install.sh: .venv is up to date"
    exit 0
fi
# pip's build warnings are noise when it works; on failure show its output (less the
# harmless "Location ... is ignored" lines) and keep its exit code.
quiet_pip() {
    rc=0
    out=$("$venv/bin/python" -m pip "$@" 2>&1) || rc=$?
    [ "$rc" = 0 ] || printf '%s\n' "$out" | grep -v -e "is ignored" -e '^$' >&2 || true
    return "$rc"
}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || die "could not create $venv"
quiet_pip install -q --upgrade pip || die "could not upgrade pip in $venv"
quiet_pip install -q -e "$here[dev]" || die "pip install -e '.[dev]' failed (see above)"
"$venv/bin/python" -c 'import edgeserve, onnxruntime, openvino' \
    || die "the install did not complete; run: $venv/bin/pip install -e '.[dev]'"
echo "$want" > "$stamp"
echo "install.sh: ready: $venv/bin/edgeserve"
