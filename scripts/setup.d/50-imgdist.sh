# imgdist: curl and tc (iproute2) for benchmarks/swarm_lan.py (plain-HTTP side and link shaping);
# nginx, the production origin (`catalogue nginx-conf`), which tests/test_nginx_origin.py runs with
# a private config on a loopback port.
# The tests need only that, what 10-apt-vm installs (qemu-img, qemu-system for a paused VM) and
# libtorrent from PyPI (pyproject.toml).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install curl iproute2 nginx
# The package's init script may have started nginx with the stock site on port 80; the tests never
# use it, so stop it (by its pid file only) when it runs. An origin enables it on purpose.
if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
  echo "    nginx: stopping the packaged server from /run/nginx.pid"
  kill "$(cat /run/nginx.pid)" || true
fi
