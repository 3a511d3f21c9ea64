#!/bin/sh
# Install this millrace edge bundle on a gateway (written by `millrace provision`).
#
#   sudo ./install.sh                        install under /, as user millrace, start the service
#   ./install.sh --root DIR                  a relocated trial install under DIR (no user, no systemd)
#   sudo ./install.sh --release-key FILE     first install: trust this release public key
#
# Before anything else the manifest's signature is verified with the release public key
# this gateway trusts (/etc/millrace/release.pub, or --release-key FILE), then every file
# against the manifest. Safe to run twice: an installed release is reused,
# unchanged files are left alone and the service restarts only when something changed.
# Layout (the same as Ansible's edge_agent role):
#   /opt/millrace/releases/<release>/venv   one virtual environment per release
#   /opt/millrace/current, previous         symlinks; a failed start switches back
#   /etc/millrace/agent.toml, pki/           config, CA, device certificate and key (0600)
#   /etc/millrace/release.pub                the release public key bundles must be signed with
#   /var/lib/millrace                        the agent's state: outbox, command log
#
# Exit status: 0 installed (or already installed), 1 failed, 2 usage,
# 3 refused: the signature, the manifest or the platform does not match, 4 the new key, config or release
# failed its check or did not start, and the previous files and release were restored.
set -eu
umask 022

AGENT_USER=millrace
UNIT=millrace-edge.service

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
refuse() { printf 'install.sh: refusing to install: %s\n' "$*" >&2; exit 3; }
usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --root DIR      install everything under DIR, with paths in the config and unit rewritten
                  to point there; implies --no-user and --no-service
  --no-user       do not create the millrace user; files stay owned by the caller
  --no-service    do not call systemctl (containers, image builds, tests)
  --skip-check    do not look up the broker's name nor run `millrace edge check`
  --python PATH   the Python 3.11+ to build the virtual environment with (python3)
  --release-key FILE  verify with this release public key (the PKI's release.pub) and
                  trust it from now on; needed on the first install only
The install uses only the bundle's own wheels (pip --no-index --require-hashes).
EOF
}

root=/
manage_user=1
manage_service=1
run_check=1
release_key=
python=${MILLRACE_PYTHON:-python3}
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || { usage >&2; exit 2; }; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --no-user) manage_user=0; shift ;;
        --no-service) manage_service=0; shift ;;
        --skip-check) run_check=0; shift ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift 2 ;;
        --release-key) [ $# -ge 2 ] || { usage >&2; exit 2; }; release_key=$2; shift 2 ;;
        --release-key=*) release_key=${1#--release-key=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'install.sh: unknown option %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done

case $root in
    /) prefix='' ;;
    /*[!/]*) prefix=${root%/} ;;
    *) die "--root must be an absolute directory, got '$root'" ;;
esac
case $prefix in *[!A-Za-z0-9._/-]*) die "--root may only contain A-Z a-z 0-9 . _ - /" ;; esac
if [ -n "$release_key" ]; then
    case $release_key in /*) ;; *) release_key=$PWD/$release_key ;; esac
    [ -f "$release_key" ] || die "--release-key $release_key: no such file"
fi
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
cd "$here"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# -- 1. authenticity, then integrity, before any other file is read or anything touched ----
trusted=$prefix/etc/millrace/release.pub
verify_key=${release_key:-$trusted}
command -v openssl >/dev/null 2>&1 \
    || die "openssl is required to verify the bundle's signature (Debian: apt-get install openssl)"
[ -f "$verify_key" ] || refuse "no trusted release key at $trusted: \
pass --release-key FILE (the PKI's release.pub) on the first install"
[ -f MANIFEST.sha256.sig ] || refuse "MANIFEST.sha256.sig is missing: the bundle is not signed"
[ -f MANIFEST.sha256 ] || refuse "MANIFEST.sha256 is missing"
if [ -L MANIFEST.sha256 ] || [ -L MANIFEST.sha256.sig ]; then
    refuse "MANIFEST.sha256 and its signature must be regular files"
fi
if ! openssl pkeyutl -verify -pubin -inkey "$verify_key" -rawin -in MANIFEST.sha256 \
    -sigfile MANIFEST.sha256.sig >"$work/sig" 2>&1; then
    refuse "the manifest's signature does not verify with $verify_key \
(signed by another key, or changed since it was signed)"
fi
say "signature verified ($verify_key)"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum (coreutils) is required"
odd=$(find . ! -type f ! -type d -print | head -n 1)
[ -z "$odd" ] || refuse "$odd is not a regular file"
if grep -qv '^[0-9a-f]\{64\}  [A-Za-z0-9._+/-]\{1,\}$' MANIFEST.sha256 \
    || grep -q '\.\./\|  /' MANIFEST.sha256; then
    refuse "MANIFEST.sha256 has malformed lines"
fi
sed 's/^[0-9a-f]\{64\}  //' MANIFEST.sha256 | LC_ALL=C sort >"$work/listed"
find . -type f ! -path ./MANIFEST.sha256 ! -path ./MANIFEST.sha256.sig -print \
    | sed 's#^\./##' | LC_ALL=C sort >"$work/present"
if ! cmp -s "$work/listed" "$work/present"; then
    extra=$(LC_ALL=C comm -13 "$work/listed" "$work/present" | tr '\n' ' ')
    missing=$(LC_ALL=C comm -23 "$work/listed" "$work/present" | tr '\n' ' ')
    refuse "files differ from the manifest (not listed: ${extra:-none}; missing: ${missing:-none})"
fi
if ! sha256sum --check --strict --quiet MANIFEST.sha256 >"$work/sums" 2>&1; then
    refuse "checksum mismatch: $(head -n 3 "$work/sums" | tr '\n' ' ')"
fi
say "manifest verified ($(grep -c '' MANIFEST.sha256) files)"

# -- 2. what is being installed, and where ----------------------------------------------------
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$python is not Python 3.11 or newer (or not installed)"
# The bundle's wheels are for one platform (`uname -m`): refuse another before anything else.
bundle_platform=$("$python" -c \
    'import json; print(json.load(open("bundle.json")).get("platform", "unknown"))')
machine=$(uname -m)
[ "$bundle_platform" = "$machine" ] || refuse "this bundle is for $bundle_platform gateways, \
this machine is $machine (uname -m): provision one with --platform $machine"
# Its compiled wheels are for one Python minor version, the one `provision` ran with.
bundle_python=$("$python" -c \
    'import json; print(json.load(open("bundle.json")).get("python", "unknown"))')
here_python=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$bundle_python" = "$here_python" ] || refuse "this bundle's wheels are for Python \
$bundle_python, $python here is $here_python: provision it with Python $here_python"
# Debian's python3 comes without ensurepip (package python3-venv): say so in one line before
# anything is touched, not with venv's page of advice after the user and directories exist.
"$python" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$python cannot create virtual environments (Debian: apt-get install python3-venv)"
# The broker's name must resolve on this gateway, or the agent only retries in its log:
# `edge check` below finds it too, but this says so before anything is touched.
if [ "$run_check" = 1 ]; then
    "$python" - config/agent.toml <<'EOF' || exit 1
import socket
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    broker = tomllib.load(f).get("broker", {})
host, port = broker.get("host", ""), broker.get("port", 8883)
try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
except (OSError, UnicodeError) as exc:
    reason = getattr(exc, "strerror", None) or exc
    sys.exit(
        f"install.sh: error: the broker host {host!r} ([broker] host) does not resolve on this"
        f" gateway ({reason}): add it to DNS or /etc/hosts, then run install.sh again"
    )
EOF
fi
json_field() {
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}
release_id=$(json_field agent/release.json release_id)
wheel=$(json_field agent/release.json wheel)
device_id=$(json_field bundle.json device_id)
case $release_id in '' | *[!A-Za-z0-9._+-]*) refuse "bad release id '$release_id'" ;; esac
case $wheel in millrace_edge-*.whl) ;; *) refuse "bad wheel name '$wheel'" ;; esac

if [ -n "$prefix" ]; then
    manage_user=0
    manage_service=0
fi
if [ "$manage_user" = 1 ] || [ "$manage_service" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "run as root, or try it out with --root DIR"
fi
opt=$prefix/opt/millrace
etc=$prefix/etc/millrace
state=$prefix/var/lib/millrace
units=$prefix/etc/systemd/system
changed=0
: >"$work/replaced"

# A relocated install rewrites the standard paths so the agent runs from under --root.
relocate() {
    if [ -n "$prefix" ]; then
        sed -e "s|/opt/millrace|$prefix/opt/millrace|g" \
            -e "s|/etc/millrace|$prefix/etc/millrace|g" \
            -e "s|/var/lib/millrace|$prefix/var/lib/millrace|g" "$1" >"$2"
    else
        cp "$1" "$2"
    fi
}

# install_file SRC DEST MODE OWNER: replace DEST only when content, mode or owner differ;
# the old file is kept as DEST.previous for a rollback. The old device key's copy lives
# only until this run ends: rollback moves it back, success deletes it (forget_old_key).
install_file() {
    want_owner=$4
    [ "$manage_user" = 1 ] || want_owner=$(id -un):$(id -gn)
    if [ -f "$2" ] && cmp -s "$1" "$2" \
        && [ "$(stat -c '%a %U:%G' "$2")" = "$(printf '%o' "0$3") $want_owner" ]; then
        return 0
    fi
    if [ -f "$2" ]; then
        cp -p "$2" "$2.previous"
        printf '%s\n' "$2" >>"$work/replaced"
    fi
    (umask 077 && cp "$1" "$2.tmp.$$")
    chmod "$3" "$2.tmp.$$"
    [ "$manage_user" = 0 ] || chown "$4" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    changed=1
    say "installed $2"
}

if [ ! -f pki/device.key ] && [ ! -f "$etc/pki/device.key" ]; then
    die "this bundle carries no key (its certificate was signed from the device's CSR); \
the key must already be at $etc/pki/device.key"
fi

# -- 3. the service user and directories ----------------------------------------------------
if [ "$manage_user" = 1 ] && ! id -u "$AGENT_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/millrace --no-create-home \
        --shell /usr/sbin/nologin --comment "millrace edge agent" "$AGENT_USER"
    changed=1
    say "created user $AGENT_USER"
fi
mkdir -p "$opt/releases" "$etc" "$units"
mkdir -p "$etc/pki" "$state"
if [ "$manage_user" = 1 ]; then
    chown "root:$AGENT_USER" "$etc/pki"
    chown "$AGENT_USER:$AGENT_USER" "$state"
fi
chmod 0750 "$etc/pki"
chmod 0700 "$state"

# -- 4. the release: one virtual environment per release id -----------------------------------
rel=$opt/releases/$release_id
if [ ! -f "$rel/.complete" ]; then
    say "installing release $release_id"
    rm -rf "$rel"
    mkdir -p "$rel"
    "$python" -m venv "$rel/venv" \
        || die "'$python -m venv' failed (Debian: apt-get install python3-venv)"
    # Only the bundle's own files, each pinned by its sha256: no index, no pip.conf, no
    # PIP_* variable of this machine (--isolated, PIP_CONFIG_FILE=/dev/null).
    set -- --no-index --require-hashes --no-deps --find-links "$here/agent" \
        --disable-pip-version-check --no-input --quiet -r agent/requirements.txt
    if [ -d wheels ]; then
        set -- --find-links "$here/wheels" "$@"
    fi
    PIP_CONFIG_FILE=/dev/null "$rel/venv/bin/python" -m pip --isolated install "$@" \
        || die "pip could not install the release from the bundle's wheels"
    "$rel/venv/bin/python" -m pip check --disable-pip-version-check >/dev/null \
        || die "the release's dependencies are inconsistent: $("$rel/venv/bin/python" -m pip check)"
    cp agent/release.json "$rel/release.json"
    : >"$rel/.complete"
    changed=1
fi

# rollback REASON: put back every file this run replaced (the old key included, so no
# DEST.previous of a key outlives the run) and the previous release, then exit 4.
switched=0
rollback() {
    printf 'install.sh: %s\n' "$1" >&2
    while read -r file; do
        [ -z "$file" ] || mv -f "$file.previous" "$file"
    done <"$work/replaced"
    previous=$(readlink "$opt/previous" 2>/dev/null || true)
    if [ "$switched" = 1 ] && [ -n "$previous" ]; then
        ln -sfn "$previous" "$opt/current.tmp" && mv -Tf "$opt/current.tmp" "$opt/current"
        printf 'install.sh: rolled back to %s\n' "$previous" >&2
    fi
    if [ "$manage_service" = 1 ]; then
        systemctl daemon-reload
        systemctl restart "$UNIT" || true
    fi
    exit 4
}

# -- 5. config, certificates, unit ---------------------------------------------------------------
relocate config/agent.toml "$work/agent.toml"
install_file "$work/agent.toml" "$etc/agent.toml" 0640 "root:$AGENT_USER"
install_file pki/ca.crt "$etc/pki/ca.crt" 0644 root:root
install_file pki/device.crt "$etc/pki/device.crt" 0644 root:root
if [ -f pki/device.key ]; then
    install_file pki/device.key "$etc/pki/device.key" 0600 "$AGENT_USER:$AGENT_USER"
fi
"$rel/venv/bin/python" - "$etc/pki/device.crt" "$etc/pki/device.key" <<'EOF' \
    || rollback "$etc/pki/device.key does not belong to the certificate in this bundle"
import ssl
import sys

# OpenSSL refuses a key that does not match the certificate (KEY_VALUES_MISMATCH).
try:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(sys.argv[1], sys.argv[2])
except (ssl.SSLError, OSError) as exc:
    sys.exit(f"install.sh: {exc}")
EOF
relocate "systemd/$UNIT" "$work/$UNIT"
install_file "$work/$UNIT" "$units/$UNIT" 0644 root:root
if [ -n "$release_key" ]; then
    install_file "$release_key" "$trusted" 0644 root:root
fi

# -- 6. switch to the release, check it, start it ---------------------------------------------
current=$(readlink "$opt/current" 2>/dev/null || true)
if [ "$current" != "releases/$release_id" ]; then
    if [ -n "$current" ]; then
        ln -sfn "$current" "$opt/previous.tmp" && mv -Tf "$opt/previous.tmp" "$opt/previous"
    fi
    ln -sfn "releases/$release_id" "$opt/current.tmp" && mv -Tf "$opt/current.tmp" "$opt/current"
    switched=1
    changed=1
    say "current release is now $release_id (was ${current:-none})"
fi

# `edge check` asks the plant broker with the new key, certificate and CA (a TLS handshake
# only while the old agent runs, else also a CONNACK) and reads every signal once. It exits
# 1 when the broker refused them (rolls back) or a signal cannot be read right now (a PLC
# switched off: reported, not fatal); its JSON says which. 2 (invalid config) rolls back.
if [ "$run_check" = 1 ] && [ "$changed" = 1 ]; then
    check_status=0
    "$opt/current/venv/bin/millrace" edge check --config "$etc/agent.toml" --json \
        >"$work/check" 2>"$work/check.err" || check_status=$?
    if [ "$check_status" -le 1 ]; then
        "$opt/current/venv/bin/python" - "$work/check" >"$work/check.txt" 2>&1 <<'EOF' \
            || rollback "millrace edge check failed: broker: $(cat "$work/check.txt")"
import json
import sys

report = json.load(open(sys.argv[1]))
broker = next(c for c in report["checks"] if c["check"] == "broker")
if not broker["ok"]:
    sys.exit(broker["problem"])
print(f"broker: {broker['mode']} check ok")
print("; ".join(f"{s['metric']}: {s['problem']}" for s in report["signals"] if not s["ok"]))
EOF
    fi
    case $check_status in
        0) say "millrace edge check passed ($(head -n 1 "$work/check.txt"))" ;;
        1) say "warning: some signals cannot be read now: $(tail -n +2 "$work/check.txt")" ;;
        *) rollback "millrace edge check failed: $(tail -n 5 "$work/check.err")" ;;
    esac
fi

if [ "$manage_service" = 1 ]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable --quiet "$UNIT"
        # Type=notify: restart returns once the agent reported READY=1, or fails.
        if [ "$changed" = 1 ]; then
            systemctl restart "$UNIT" || rollback "$UNIT did not start"
        else
            systemctl start "$UNIT" || rollback "$UNIT did not start"
        fi
        systemctl is-active --quiet "$UNIT" || rollback "$UNIT is not active"
    else
        say "systemd is not running here: enable and start $UNIT yourself"
    fi
fi

# `millrace` on PATH, for the check docs/edge.md shows: sudo millrace edge check --sandbox
path_link=$prefix/usr/local/bin/millrace
if [ "$(readlink "$path_link" 2>/dev/null || true)" != "$opt/current/venv/bin/millrace" ]; then
    mkdir -p "${path_link%/*}"
    ln -sfn "$opt/current/venv/bin/millrace" "$path_link"
    say "linked $path_link"
fi

# The new certificate and key work: no old private key stays on the gateway (nor one an
# older install.sh left behind). Old certificates stay; they are public.
forget_old_key() {
    if [ -e "$etc/pki/device.key.previous" ]; then
        rm -f "$etc/pki/device.key.previous"
        say "removed the previous device key"
    fi
}
forget_old_key

if [ "$changed" = 1 ]; then
    say "device $device_id: release $release_id installed"
else
    say "device $device_id: release $release_id already installed, nothing changed"
fi
echo "changed=$changed"
