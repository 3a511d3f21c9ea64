#!/bin/sh
# millrace first boot: install the device bundle `millrace provision --sd` put on the card.
#
#   firstboot.sh            stage: run once from the kernel command line (boot partition
#                           variant). Moves the bundle off the world-readable FAT partition
#                           into /var/lib/millrace-firstboot (0700), enables
#                           millrace-firstboot.service, removes its own hook from
#                           cmdline.txt and lets the system reboot.
#   firstboot.sh install    run by millrace-firstboot.service once the network is up:
#                           unpack the bundle, run its install.sh, then disable itself and
#                           delete the staged bundle (and with it the device key's copy).
#
# MILLRACE_ROOT (default /) relocates every path, and extra arguments after `install` go to
# install.sh: both exist for tests and image builds.
set -eu
umask 077

root=${MILLRACE_ROOT:-/}
prefix=${root%/}
stage=$prefix/var/lib/millrace-firstboot
units=$prefix/etc/systemd/system
UNIT=millrace-firstboot.service

say() { printf 'millrace-firstboot: %s\n' "$*"; }

do_stage() {
    boot_dir=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
    mkdir -p "$stage" && chmod 0700 "$stage"
    cp "$boot_dir/bundle.tar.gz" "$stage/bundle.tar.gz.tmp"
    mv -f "$stage/bundle.tar.gz.tmp" "$stage/bundle.tar.gz"
    cp "$boot_dir/firstboot.sh" "$stage/firstboot.sh"
    chmod 0755 "$stage/firstboot.sh"
    # The release public key the card was written with: install.sh verifies the bundle
    # with it. A key the gateway already trusts is kept.
    if [ -f "$boot_dir/release.pub" ] && [ ! -f "$prefix/etc/millrace/release.pub" ]; then
        mkdir -p "$prefix/etc/millrace"
        chmod 0755 "$prefix/etc/millrace"
        cp "$boot_dir/release.pub" "$prefix/etc/millrace/release.pub"
        chmod 0644 "$prefix/etc/millrace/release.pub"
    fi
    mkdir -p "$units/multi-user.target.wants"
    cp "$boot_dir/$UNIT" "$units/$UNIT"
    chmod 0644 "$units/$UNIT"
    ln -sfn "/etc/systemd/system/$UNIT" "$units/multi-user.target.wants/$UNIT"
    cmdline=$boot_dir/../cmdline.txt
    if [ -f "$cmdline" ]; then
        sed -e 's| systemd\.run=[^ ]*millrace/firstboot\.sh||' \
            -e 's| systemd\.run_success_action=reboot||' \
            -e 's| systemd\.unit=kernel-command-line\.target||' "$cmdline" >"$cmdline.tmp"
        mv -f "$cmdline.tmp" "$cmdline"
    fi
    # The FAT partition cannot protect the key: remove every copy from it.
    rm -rf "$boot_dir"
    sync
    say "staged the bundle; it installs on the next boot"
}

do_install() {
    [ -f "$stage/bundle.tar.gz" ] || { say "no staged bundle, nothing to do"; return 0; }
    rm -rf "$stage/unpacked"
    mkdir -p "$stage/unpacked" && chmod 0700 "$stage/unpacked"
    tar -xzf "$stage/bundle.tar.gz" -C "$stage/unpacked" --no-same-owner
    set -- "$stage"/unpacked/millrace-*/install.sh "$@"
    [ -f "$1" ] || { say "the bundle has no install.sh" >&2; exit 1; }
    "$@"
    rm -f "$units/multi-user.target.wants/$UNIT"
    rm -rf "$stage"
    say "installed; first-boot service disabled"
}

case ${1:-stage} in
    stage) do_stage ;;
    install) shift; do_install "$@" ;;
    *) echo "usage: firstboot.sh [stage | install [install.sh options]]" >&2; exit 2 ;;
esac
