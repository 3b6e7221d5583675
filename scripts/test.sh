#!/usr/bin/env bash
# The README's test command (and CI's, through .ci/run): installs what the tests need, then runs them.
#
#   bash scripts/test.sh                   # everything, as CI runs it
#   bash scripts/test.sh -m 'not slow'     # arguments go to pytest
#
# Three tools come from Debian rather than PyPI: promtool (package prometheus) checks the metrics
# exposition and the alert rules, redis-server backs the Redis snapshot tests, nginx runs the
# shipped deploy/nginx configuration in front of replicas in the routing tests. Missing ones are
# installed with apt-get (through sudo when not root), without starting the packages' own services
# (a policy-rc.d that says no, for the install only, and RUNLEVEL=1 where there is no systemd; the
# tests start their own servers on loopback) and without enabling them at boot. Where that is impossible the
# script says what to install and runs the tests anyway: the tests that need a tool fail naming it.
# Everything else comes from the test extra, into the Python environment that runs this script
# (use a virtual environment where that Python is Debian's own).
set -euo pipefail
cd "$(dirname "$0")/.."

# tool=Debian package
missing=()
tools="promtool=prometheus redis-server=redis-server nginx=nginx"
have() {  # nginx lives in /usr/sbin, outside a non-root user's PATH
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}
for pair in $tools; do
    have "${pair%%=*}" || missing+=("${pair#*=}")
done

if [ ${#missing[@]} -gt 0 ]; then
    as_root=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
        [ -t 0 ] || as_root+=(-n)  # no terminal (CI): never wait for a password
    fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ ${#as_root[@]} -gt 0 ]; }; then
        echo "scripts/test.sh: installing ${missing[*]} (apt-get; their services stay off)" >&2
        policy=/usr/sbin/policy-rc.d
        own_policy=0
        if [ ! -e "$policy" ]; then  # no service starts while this exists (Debian's rule)
            "${as_root[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy" \
                && own_policy=1
        fi
        "${as_root[@]}" apt-get update -qq || true  # a stale package list may still do
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || true
        [ "$own_policy" = 1 ] && "${as_root[@]}" rm -f "$policy"
        if command -v systemctl >/dev/null 2>&1; then  # nor at the next boot
            for package in "${missing[@]}"; do
                "${as_root[@]}" systemctl disable --quiet "$package" 2>/dev/null || true
            done
        fi
    fi
    for pair in $tools; do
        have "${pair%%=*}" ||
            echo "scripts/test.sh: ${pair%%=*} is missing and could not be installed here;" \
                "install Debian's ${pair#*=} package: the tests that need it fail until then" >&2
    done
fi

python3 -m pip install -e '.[test]'
python3 -m pytest "$@"
