# imgdist: curl and tc (iproute2) for benchmarks/swarm_lan.py (plain-HTTP side and link shaping).
# The tests need only what 10-apt-vm installs (qemu-img, qemu-system for a paused VM) and libtorrent
# from PyPI (pyproject.toml).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install curl iproute2
