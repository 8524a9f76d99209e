#!/usr/bin/env bash
# Puts Debian's promtool and prometheus under .venv/prometheus/usr/bin/ (make tools, make test).
# Idempotent. Never fails the build: without apt-get/dpkg-deb, or when the download fails, it says so
# and exits 0, and the tests that need the binaries skip with that reason.
set -u
cd "$(dirname "$0")/../.."
dest=.venv/prometheus
bin="$dest/usr/bin"
if [ -x "$bin/promtool" ] && [ -x "$bin/prometheus" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "install_tools: apt-get/dpkg-deb unavailable: promtool and prometheus not installed; their tests skip"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -q prometheus >"$work/apt.log" 2>&1); }
# A machine whose package lists were never fetched cannot find the package: as root, fetch them once.
if ! download && { [ "$(id -u)" != 0 ] || ! apt-get update -qq >>"$work/apt.log" 2>&1 || ! download; }; then
    echo "install_tools: 'apt-get download prometheus' failed; their tests skip:"
    tail -n 3 "$work/apt.log"
    exit 0
fi
mkdir -p "$dest"
if ! dpkg-deb -x "$work"/prometheus_*.deb "$work/root" \
        || ! install -D -m 0755 "$work/root/usr/bin/promtool" "$bin/promtool" \
        || ! install -D -m 0755 "$work/root/usr/bin/prometheus" "$bin/prometheus"; then
    echo "install_tools: could not unpack the prometheus package; promtool/prometheus tests skip"
    exit 0
fi
echo "install_tools: $("$bin/promtool" --version 2>&1 | head -n 1) in $bin"
