#!/bin/sh
# Refresh the locked environments (packaging/lock/dev.txt, serve.txt) from pyproject.toml,
# then prove the new set: reinstall the dev venv from it, rebuild the demo models and
# compare them with the committed files, and run the whole suite. Commit the lock only
# when all of that passes (and the rebuilt models, if --check says they differ).
#
#   packaging/lock/refresh.sh              # newest versions pyproject.toml allows
#   packaging/lock/refresh.sh -c FILE      # ... held to the versions in FILE (pip freeze)
set -eu
cd "$(dirname "$0")/../.."
tools="${TMPDIR:-/tmp}/edgeserve-lock-tools"
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q uv; }
python_version=3.11  # the project's machines; install.sh falls back to unpinned elsewhere
platform=x86_64-manylinux_2_28
compile() {  # compile OUTPUT [uv options...]
    out=$1
    shift
    "$tools/bin/uv" pip compile pyproject.toml "$@" --python-version "$python_version" \
        --python-platform "$platform" --no-header --quiet -o "$out.new"
    {
        echo "# python $python_version, $platform: made by packaging/lock/refresh.sh"
        echo "# from pyproject.toml; do not edit by hand"
        grep -v -e '^ *#   -c ' -e '^ *# via -c ' "$out.new"
    } >"$out"
    rm -f "$out.new"
}
compile packaging/lock/dev.txt --extra dev --generate-hashes "$@"
compile packaging/lock/serve.txt --extra grpc --extra batch --generate-hashes "$@"
./install.sh --dev
.venv/bin/python models/build.py --check
.venv/bin/python -m pytest -q
