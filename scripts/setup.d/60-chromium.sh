# Debian's headless chromium: tests/test_controller_page.py loads the controller's status page in it
# (a real browser renders the roles' rows). Only tests use it; a site never needs it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install chromium
