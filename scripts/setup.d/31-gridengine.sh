# Son of Grid Engine 8.1.9 (master, exec, client) and its DRMAA 1.0 library, installed
# non-interactively (debconf preseeding); the test fixtures start sge_qmaster/sge_execd themselves.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
host=$(hostname)
echo "    gridengine: preseeding debconf (cell default, master $host)"
for pkg in gridengine-common gridengine-client gridengine-master; do
  printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string %s\n' \
    "$pkg" "$pkg" "$pkg" "$host" | debconf-set-selections
done
# libjemalloc2: libdrmaa must be LD_PRELOADed with it (else "cannot allocate memory in static TLS").
apt_install gridengine-master gridengine-exec gridengine-client gridengine-drmaa1.0 libjemalloc2
