# QEMU, image tools, a Debian kernel and busybox for the demo guests, libvirt and its headers.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install qemu-system-x86 qemu-utils busybox-static linux-image-amd64 xz-utils e2fsprogs \
  genisoimage cpio libvirt-daemon-system libvirt-dev pkg-config gcc python3-venv python3-dev \
  iproute2 procps psmisc debootstrap
