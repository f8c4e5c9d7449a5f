# QEMU, image tools, a Debian kernel, busybox and dropbear (its sshd) for the demo guests, libvirt and its headers;
# OVMF and the whole-disk image tools (sfdisk, mtools, syslinux, systemd-boot) for firmware boot;
# nftables for the site network (network: site).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install qemu-system-x86 qemu-utils busybox-static linux-image-amd64 xz-utils e2fsprogs \
  genisoimage cpio libvirt-daemon-system libvirt-dev pkg-config gcc python3-venv python3-dev \
  iproute2 nftables procps psmisc debootstrap dropbear-bin \
  ovmf fdisk mtools dosfstools syslinux syslinux-common systemd-boot-efi
