#!/bin/sh
# edgeserve installer: a local serving setup (--serve), a development setup (--dev), or a
# box install with systemd.
# POSIX sh; every step checks before it acts, so running it twice changes nothing.
set -eu

usage() {
    cat <<'USAGE'
Usage:
  ./install.sh --serve                ./.venv with what serving needs (the README's first command)
  ./install.sh --dev                  ./.venv with that and the test and build tools (~2 GB)
  sudo ./install.sh [options]         install on this box as a systemd service
  sudo ./install.sh --uninstall [--purge] [options]

Box install: a virtual environment under PREFIX with edgeserve from this checkout (or
--wheel), the models from ./models, the system user "edgeserve", CONFIG_DIR/edgeserve.toml
from the default (an existing one is never overwritten), STATE_DIR (0700), the token
signing key and the at-rest master key, and the systemd unit, enabled and started; it
waits until /v2/health/ready answers 200.

Options:
  --serve             create ./.venv with edgeserve and what serving needs, then stop
  --dev               create ./.venv with edgeserve and its test tools, then stop
  --prefix DIR        program location (default /opt/edgeserve)
  --wheel FILE        install this wheel instead of the checkout
  --config-dir DIR    config location (default /etc/edgeserve)
  --state-dir DIR     state location (default /var/lib/edgeserve)
  --python PY         interpreter for the venv (default: $PYTHON or python3; 3.10+); the
                      service needs a system one, not one under /root or /home (pyenv)
  --no-systemd        no unit, no system user; files belong to whoever runs this
  --no-start          install and enable the unit but do not start it
  --memory-max SIZE   the service's memory limit, e.g. 4G or 50% (default: the unit's 2G)
  --uninstall         remove the service and the program; keep config and state
  --purge             with --uninstall: also remove config, state and the user
  -h, --help          show this help

Examples:
  ./install.sh --serve && .venv/bin/edgeserve serve
  ./install.sh --dev && .venv/bin/python -m pytest -q
  sudo ./install.sh --prefix /opt/edgeserve
  ./install.sh --prefix /tmp/es --config-dir /tmp/es-etc --state-dir /tmp/es-state --no-systemd
USAGE
}

say() { echo "install.sh: $*"; }
die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
mode=box
prefix=/opt/edgeserve
wheel=""
config_dir=/etc/edgeserve
state_dir=/var/lib/edgeserve
python=${PYTHON:-python3}
systemd=yes
start=yes
purge=no
memory_max=""
explicit=""

usage_error() {
    echo "install.sh: $*; see ./install.sh --help" >&2
    exit 2
}
need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
}
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$(pwd)/$1" ;; esac; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --dev) mode=dev ;;
        --serve) mode=serve ;;
        --uninstall) mode=uninstall ;;
        --purge) purge=yes ;;
        --no-systemd) systemd=no ;;
        --no-start) start=no ;;
        --prefix) need_value "$@"; prefix=$(absolute "$2"); shift ;;
        --wheel) need_value "$@"; wheel=$(absolute "$2"); shift ;;
        --config-dir) need_value "$@"; config_dir=$(absolute "$2"); explicit="$explicit config"; shift ;;
        --state-dir) need_value "$@"; state_dir=$(absolute "$2"); explicit="$explicit state"; shift ;;
        --python) need_value "$@"; python=$2; shift ;;
        --memory-max) need_value "$@"; memory_max=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[ "$purge" = no ] || [ "$mode" = uninstall ] || usage_error "--purge goes with --uninstall"
case "$memory_max" in
    "") ;;
    *[!0-9KMGT%]* | [!0-9]*) usage_error "--memory-max takes a size like 4G, 512M or 50%" ;;
esac
# The paths go into sed expressions, TOML strings and the unit file: keep them plain.
for path in "$prefix" "$config_dir" "$state_dir"; do
    case "$path" in
        *[!A-Za-z0-9/._+-]*) usage_error "use a path of letters, digits and / . _ + - only: $path" ;;
    esac
done

# --- checks ------------------------------------------------------------------------------

check_python() {
    command -v "$python" >/dev/null 2>&1 \
        || die "$python not found; install Python 3.10 or newer (Debian: apt-get install python3)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "Python 3.10 or newer is needed, found $("$python" -V 2>&1)"
    "$python" -c 'import venv, ensurepip' 2>/dev/null \
        || die "the Python venv module is missing (Debian: apt-get install python3-venv)"
}

# pip's build warnings are noise when it works; on failure show its output (less the
# harmless "Location ... is ignored" lines) and keep its exit code.
quiet_pip() {
    venv_python=$1
    shift
    rc=0
    out=$("$venv_python" -m pip "$@" 2>&1) || rc=$?
    [ "$rc" = 0 ] || printf '%s\n' "$out" | grep -v -e "is ignored" -e '^$' >&2 || true
    return "$rc"
}

# --- local setups: serving only (--serve) or development (--dev) ---------------------------

# install_local KIND LOCK EXTRAS: ./.venv from LOCK (pinned, for the Python it names) and
# edgeserve from this checkout, editable; one line per step, since pip itself is quiet.
install_local() {
    kind=$1
    lock="$here/$2"
    extras=$3
    check_python
    venv="$here/.venv"
    stamp="$venv/.edgeserve-installed"
    want=$(cat "$here/pyproject.toml" "$lock" 2>/dev/null | cksum)
    dev_want=$(cat "$here/pyproject.toml" "$here/packaging/lock/dev.txt" 2>/dev/null | cksum)
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ]; then
        have=$(cat "$stamp")
        if [ "$have" = "$want" ] || { [ "$kind" = serve ] && [ "$have" = "$dev_want" ]; }; then
            say ".venv is up to date"
            return 0
        fi
    fi
    if [ -x "$venv/bin/python" ]; then
        say "step 1/4: using the existing $venv"
    else
        say "step 1/4: creating $venv"
        "$python" -m venv "$venv" || die "could not create $venv"
    fi
    # The lock pins every package, for the Python it names; on another Python the newest
    # versions pyproject.toml allows are installed instead.
    locked=$(sed -n 's/^# python \([0-9.]*\),.*/\1/p' "$lock" 2>/dev/null | head -n 1)
    running=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -n "$locked" ] && [ "$locked" = "$running" ]; then
        count=$(grep -c '^[A-Za-z0-9]' "$lock")
        if [ "$kind" = dev ]; then
            say "step 2/4: installing the $kind set, $count pinned packages from $2 (about 2 GB: Spark, scikit-learn, test tools)"
        else
            say "step 2/4: installing the $kind set, $count pinned packages from $2 (runtimes, web server, gRPC, pyarrow)"
        fi
        # Both locks carry hashes: a package swapped on the index or a mirror is refused.
        quiet_pip "$venv/bin/python" install -q --require-hashes --no-deps -r "$lock" \
            || die "pip install -r $2 failed (see above)"
        say "step 3/4: installing edgeserve from this checkout (editable)"
        quiet_pip "$venv/bin/python" install -q --no-deps -e "$here" \
            || die "pip install -e . failed (see above)"
    else
        say "step 2/4: no lock for Python $running ($2 is for ${locked:-none}):" \
            "installing the newest versions pyproject.toml allows"
        quiet_pip "$venv/bin/python" install -q --upgrade pip || die "could not upgrade pip in $venv"
        say "step 3/4: installing edgeserve[$extras] from this checkout (editable)"
        quiet_pip "$venv/bin/python" install -q -e "${here}[$extras]" \
            || die "pip install -e '.[$extras]' failed (see above)"
    fi
    say "step 4/4: checking that edgeserve and both runtimes import"
    "$venv/bin/python" -c 'import edgeserve, onnxruntime, openvino' \
        || die "the install did not complete; run: $venv/bin/pip install -e '.[$extras]'"
    echo "$want" >"$stamp"
    say "ready: $venv/bin/edgeserve ($kind set)"
}

install_dev() { install_local dev packaging/lock/dev.txt dev; }
install_serve() { install_local serve packaging/lock/serve.txt grpc,batch; }

# --- box install -------------------------------------------------------------------------

marker() { echo "$prefix/.edgeserve-install"; }

# What is being installed, as one line: a changed checkout or wheel means reinstall.
source_fingerprint() {
    if [ -n "$wheel" ]; then
        cksum <"$wheel"
    else
        find "$here/edgeserve" "$here/updater" "$here/models" "$here/pyproject.toml" \
            -type f ! -path '*/__pycache__/*' ! -path "$here/models/minilm/*" ! -name '*.pyc' \
            | LC_ALL=C sort | xargs cksum | cksum
    fi
}

marker_value() {  # marker_value KEY -> the value recorded at install time, or nothing
    [ -f "$(marker)" ] || return 0
    sed -n "s/^$1=//p" "$(marker)" | head -n 1
}

install_program() {
    venv="$prefix/venv"
    fingerprint="$(source_fingerprint) python=$("$python" -V 2>&1)"
    if [ -x "$venv/bin/edgeserve" ] && [ "$(marker_value fingerprint)" = "$fingerprint" ]; then
        say "program in $prefix is up to date"
        program_changed=no
        return 0
    fi
    say "installing edgeserve into $venv"
    mkdir -p "$prefix"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || die "could not create $venv"
    # A regular (not editable) install: the box must not depend on the checkout staying.
    # A checkout is built from a clean copy, so stale files in ./build never ship.
    target=$wheel
    if [ -z "$target" ]; then
        build_dir=$(mktemp -d)
        trap 'rm -rf "$build_dir"' EXIT
        cp -R "$here/edgeserve" "$here/updater" "$here/pyproject.toml" "$here/README.md" "$build_dir/"
        find "$build_dir" -name __pycache__ -prune -exec rm -rf {} +
        target=$build_dir
    fi
    # The versions the suite passed with (packaging/lock/serve.txt), for the Python the
    # lock names; on another Python the newest versions pyproject.toml allows.
    constraints=""
    serve_lock="$here/packaging/lock/serve.txt"
    locked=$(sed -n 's/^# python \([0-9.]*\),.*/\1/p' "$serve_lock" 2>/dev/null | head -n 1)
    running=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -n "$locked" ] && [ "$locked" = "$running" ]; then
        # Without its hashes: pip checks hashes for every requirement once a constraint
        # has one, and the checkout (a folder) or a wheel built here has none to check.
        sed -e 's/ *\\$//' -e '/^ *--hash=/d' "$serve_lock" >"$venv/constraints.txt"
        constraints="--constraint=$venv/constraints.txt"
    fi
    # shellcheck disable=SC2086  # $constraints is one word or none
    quiet_pip "$venv/bin/python" install -q --upgrade $constraints "$target" \
        || die "pip install of ${wheel:-the checkout} into $venv failed (see above)"
    # Same version number, new code: pip may keep the old copy, so replace the package itself.
    quiet_pip "$venv/bin/python" install -q --force-reinstall --no-deps "$target" \
        || die "pip could not replace edgeserve in $venv (see above)"
    [ -x "$venv/bin/edgeserve" ] || die "the install did not provide $venv/bin/edgeserve"
    # The model repository and the docs travel with the program.
    if [ -d "$here/models" ]; then
        rm -rf "$prefix/models.new"
        mkdir -p "$prefix/models.new"
        (cd "$here/models" && find . -name minilm -prune -o -name __pycache__ -prune -o -print) \
            | (cd "$here/models" && while IFS= read -r p; do
                if [ -d "$p" ]; then mkdir -p "$prefix/models.new/$p"; else cp -p "$p" "$prefix/models.new/$p"; fi
            done)
        rm -rf "$prefix/models"
        mv "$prefix/models.new" "$prefix/models"
    fi
    mkdir -p "$prefix/share" "$prefix/bin"
    cp "$here/edgeserve.toml" "$prefix/share/edgeserve.toml.default"
    [ ! -f "$here/README.md" ] || cp "$here/README.md" "$prefix/share/README.md"
    program_changed=yes
    new_fingerprint=$fingerprint
}

# `PREFIX/bin/edgeserve` runs the installed program with the installed config.
install_wrapper() {
    wrapper="$prefix/bin/edgeserve"
    # shellcheck disable=SC2016 # $EDGESERVE_CONFIG and $@ are for the wrapper, not for us
    content=$(printf '#!/bin/sh\n# Written by install.sh: the installed edgeserve with its config.\n: "${EDGESERVE_CONFIG:=%s}"\nexport EDGESERVE_CONFIG\nexec "%s" "$@"\n' \
        "$config_dir/edgeserve.toml" "$prefix/venv/bin/edgeserve")
    if [ ! -f "$wrapper" ] || [ "$(cat "$wrapper")" != "$content" ]; then
        printf '%s\n' "$content" >"$wrapper"
        chmod 0755 "$wrapper"
    fi
}

install_config() {
    conf="$config_dir/edgeserve.toml"
    mkdir -p "$config_dir"
    if [ -e "$conf" ]; then
        say "keeping existing $conf"
    else
        tmp="$conf.tmp.$$"
        # Paths for this box; the substitutions are checked so a changed default fails loudly.
        sed -e "s|^state_dir = \".edgeserve\"|state_dir = \"$state_dir\"|" \
            -e "s|^repository = \"models\"|repository = \"$prefix/models\"|" \
            "$here/edgeserve.toml" >"$tmp"
        if ! grep -q "^state_dir = \"$state_dir\"" "$tmp" \
            || ! grep -q "^repository = \"$prefix/models\"" "$tmp"; then
            rm -f "$tmp"
            die "edgeserve.toml has no default state_dir/repository line to adapt"
        fi
        chmod 0640 "$tmp"
        [ "$systemd" = no ] || chgrp edgeserve "$tmp"
        mv "$tmp" "$conf"
        say "created $conf"
    fi
    "$prefix/venv/bin/python" -c 'import sys; from edgeserve.config.loader import load_settings
load_settings(sys.argv[1])' "$conf" || die "$conf does not load (see above); fix it and re-run"
}

install_state() {
    if [ "$systemd" = yes ]; then
        install -d -m 0700 -o edgeserve -g edgeserve "$state_dir" "$state_dir/keys"
    else
        install -d -m 0700 "$state_dir" "$state_dir/keys"
    fi
}

# Keys: the token signing key (if this edgeserve has `keys init`) and the at-rest master key.
install_keys() {
    edgeserve="$prefix/venv/bin/edgeserve"
    if [ -f "$state_dir/keys/token_signing_key.pem" ]; then
        :
    elif "$edgeserve" keys init --help >/dev/null 2>&1; then
        "$edgeserve" keys init --config "$config_dir/edgeserve.toml" >/dev/null \
            || die "edgeserve keys init failed"
        say "created the token signing key in $state_dir/keys"
    fi
    # Under systemd the master key stays root-only in the config dir and reaches the
    # service as a credential; without systemd it sits where the server looks by default.
    if [ "$systemd" = yes ]; then master="$config_dir/master.key"; else master="$state_dir/keys/master.key"; fi
    if [ ! -e "$master" ] && "$prefix/venv/bin/python" -c 'import updater.masterkey' 2>/dev/null; then
        "$prefix/venv/bin/python" -c 'import sys; from pathlib import Path
from updater.masterkey import generate_master_key_file
generate_master_key_file(Path(sys.argv[1]))' "$master" || die "could not create $master"
        say "created the at-rest master key $master (back it up: without it the model store is unreadable)"
    fi
    [ "$systemd" = no ] || chown -R edgeserve:edgeserve "$state_dir"
}

install_user() {
    id edgeserve >/dev/null 2>&1 && return 0
    mkdir -p /etc/sysusers.d
    cp "$here/packaging/sysusers.d/edgeserve.conf" /etc/sysusers.d/edgeserve.conf
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /etc/sysusers.d/edgeserve.conf
    else
        useradd --system --user-group --home-dir "$state_dir" --no-create-home \
            --shell /usr/sbin/nologin --comment "edgeserve model server" edgeserve
    fi
    say "created system user edgeserve"
}

# The unit with this install's paths; written only when it differs from the one in place.
install_unit() {
    unit=/etc/systemd/system/edgeserve.service
    tmp="$unit.tmp.$$"
    sed -e "s|/opt/edgeserve|$prefix|g" -e "s|/etc/edgeserve|$config_dir|g" \
        -e "s|^WorkingDirectory=/var/lib/edgeserve|WorkingDirectory=$state_dir|" \
        "$here/packaging/systemd/edgeserve.service" >"$tmp"
    if [ "$state_dir" != /var/lib/edgeserve ]; then
        printf '[Service]\nReadWritePaths=%s\n' "$state_dir" >>"$tmp"
    fi
    unit_changed=no
    if [ -f "$unit" ] && cmp -s "$tmp" "$unit"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$unit"
        unit_changed=yes
        say "installed $unit"
    fi
    # --memory-max goes into a drop-in, so the unit itself stays the packaged one.
    dropin="$unit.d/10-install-memory.conf"
    if [ -n "$memory_max" ]; then
        content=$(printf '# Written by install.sh --memory-max\n[Service]\nMemoryMax=%s\n' "$memory_max")
        if [ ! -f "$dropin" ] || [ "$(cat "$dropin")" != "$content" ]; then
            mkdir -p "$unit.d"
            printf '%s\n' "$content" >"$dropin"
            unit_changed=yes
            say "memory limit $memory_max ($dropin)"
        fi
    fi
    [ "$unit_changed" = no ] || systemctl daemon-reload
    systemctl is-enabled --quiet edgeserve 2>/dev/null || systemctl enable --quiet edgeserve
}

wait_ready() {
    url=$("$prefix/venv/bin/python" -c 'import sys; from edgeserve.config.loader import load_settings
s = load_settings(sys.argv[1]).server
host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(s.host, s.host)
host = f"[{host}]" if ":" in host else host
scheme = "https" if s.tls_cert else "http"
print(f"{scheme}://{host}:{s.port}/v2/health/ready")' "$config_dir/edgeserve.toml")
    say "waiting for $url"
    "$prefix/venv/bin/python" - "$url" <<'PY' || die "not ready in time; see: journalctl -u edgeserve"
import ssl, sys, time, urllib.request
deadline = time.monotonic() + 180
context = ssl._create_unverified_context()  # a self-signed box certificate is fine here
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2, context=context) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
    say "edgeserve is ready"
}

install_box() {
    check_python
    [ -n "$wheel" ] && { [ -f "$wheel" ] || die "no such wheel: $wheel"; }
    if [ "$systemd" = yes ]; then
        [ "$(id -u)" = 0 ] || die "the service install needs root (or use --no-systemd)"
        # The venv links to this interpreter: the service user must reach it, and the
        # unit's ProtectHome=yes hides /root and /home (pyenv and friends live there).
        real_python=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
        case "$real_python" in
            /root/* | /home/*)
                die "$python is $real_python, which the service cannot run (ProtectHome=yes);" \
                    "use a system Python: --python /usr/bin/python3" ;;
        esac
        if ! command -v systemctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ]; then
            die "systemd is not running on this machine; use --no-systemd (and run edgeserve yourself)"
        fi
        install_user
    fi
    program_changed=no
    new_fingerprint=""
    install_program
    install_wrapper
    install_config
    install_state
    install_keys
    if [ -n "$new_fingerprint" ] || [ ! -f "$(marker)" ]; then
        {
            echo "fingerprint=${new_fingerprint:-$(marker_value fingerprint)}"
            echo "config_dir=$config_dir"
            echo "state_dir=$state_dir"
            echo "systemd=$systemd"
        } >"$(marker)"
    fi
    # The state folder's own marker: it lets a later --uninstall --purge (after the
    # program and its marker are gone) know the folder is install.sh's to remove.
    [ -f "$state_dir/.edgeserve-install" ] || echo "prefix=$prefix" >"$state_dir/.edgeserve-install"
    if [ "$systemd" = yes ]; then
        mkdir -p /etc/tmpfiles.d
        cp "$here/packaging/tmpfiles.d/edgeserve.conf" /etc/tmpfiles.d/edgeserve.conf
        install_unit
        if [ "$start" = yes ]; then
            if ! systemctl is-active --quiet edgeserve; then
                systemctl start edgeserve
            elif [ "$program_changed" = yes ] || [ "$unit_changed" = yes ]; then
                systemctl restart edgeserve
            fi
            wait_ready
        fi
    fi
    say "installed: $prefix/bin/edgeserve (config $config_dir/edgeserve.toml, state $state_dir)"
    [ "$systemd" = yes ] || say "start it with: $prefix/bin/edgeserve serve"
}

# --- uninstall ---------------------------------------------------------------------------

# The folder a path names once `.`, `..`, repeated and trailing slashes and symlinks are
# resolved: `/var/lib/` and `/srv/x/..` are judged as /var/lib and /srv.
normalised() {
    realpath -m -- "$1" 2>/dev/null || die "cannot resolve $1 (realpath -m from coreutils is needed)"
}

refuse_dangerous() {  # never rm -rf a system folder because of a typo in an option
    target=$(normalised "$1")
    home=$(normalised "${HOME:-/root}")
    case "$target" in
        /*/*) ;;  # two levels or more; the well-known ones below are refused too
        *) die "refusing to remove $1 ($target is a top-level folder)" ;;
    esac
    case "$target" in
        /usr/* | /var/lib | /var/log | /var/cache | /var/tmp | /home/* | /root/* | /etc/systemd | "$home")
            die "refusing to remove $1 ($target)" ;;
    esac
    case "$home/" in
        "$target"/*) die "refusing to remove $1 ($target holds $home)" ;;
    esac
}

# --purge removes only what install.sh set up: the state folder must hold the marker that
# install writes there, or be the one the program's marker recorded.
refuse_unmarked_purge() {
    [ -f "$state_dir/.edgeserve-install" ] && return 0
    if [ -f "$(marker)" ] && [ "$(normalised "$(marker_value state_dir)")" = "$(normalised "$state_dir")" ]; then
        return 0
    fi
    die "$state_dir was not set up by install.sh (no $state_dir/.edgeserve-install, and no $(marker) naming it); not purging"
}

uninstall_box() {
    prefix=$(normalised "$prefix")  # what is removed is what the checks below judged
    # Paths recorded at install time are the defaults, so `--uninstall` alone is enough.
    case "$explicit" in *config*) ;; *) config_dir=$(marker_value config_dir); config_dir=${config_dir:-/etc/edgeserve} ;; esac
    case "$explicit" in *state*) ;; *) state_dir=$(marker_value state_dir); state_dir=${state_dir:-/var/lib/edgeserve} ;; esac
    config_dir=$(normalised "$config_dir")
    state_dir=$(normalised "$state_dir")
    recorded=$(marker_value systemd)
    [ "$recorded" != no ] || systemd=no
    if [ "$purge" = yes ]; then  # every check before anything is removed
        refuse_dangerous "$state_dir"
        refuse_dangerous "$config_dir"
        refuse_unmarked_purge
    fi
    if [ -f "$(marker)" ]; then
        refuse_dangerous "$prefix"
    fi
    if [ "$systemd" = yes ] && [ -f /etc/systemd/system/edgeserve.service ]; then
        [ "$(id -u)" = 0 ] || die "removing the service needs root"
        systemctl disable --now --quiet edgeserve 2>/dev/null || true
        rm -f /etc/systemd/system/edgeserve.service /etc/tmpfiles.d/edgeserve.conf
        rm -rf /etc/systemd/system/edgeserve.service.d
        systemctl daemon-reload 2>/dev/null || true
        say "removed the edgeserve service"
    fi
    if [ -f "$(marker)" ]; then
        refuse_dangerous "$prefix"
        rm -rf "$prefix"
        say "removed $prefix"
    elif [ -e "$prefix" ]; then
        die "$prefix was not installed by install.sh (no $(marker)); not removing it"
    else
        say "nothing installed in $prefix"
    fi
    if [ "$purge" = yes ]; then
        rm -rf "$state_dir"
        rm -f "$config_dir/edgeserve.toml" "$config_dir/master.key"
        rmdir "$config_dir" 2>/dev/null || true
        if [ "$systemd" = yes ] && id edgeserve >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            userdel edgeserve 2>/dev/null || true
            rm -f /etc/sysusers.d/edgeserve.conf
        fi
        say "purged config ($config_dir) and state ($state_dir)"
    else
        say "kept config ($config_dir) and state ($state_dir); --purge removes them"
    fi
}

case "$mode" in
    dev) install_dev ;;
    serve) install_serve ;;
    box) install_box ;;
    uninstall) uninstall_box ;;
esac
