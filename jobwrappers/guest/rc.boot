#!/bin/sh
# One-time boot of the demo guest: filesystems, the config drive (NoCloud, label cidata), hostname,
# network (slirp's fixed addresses, or network: site's static one; no DHCP wait), SSH keys
# (authorized and the host's own), persistent disks, ACPI power button.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /run /tmp
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/salvus /run/cidata
# The config drive is the ISO9660 disk whose volume label is cidata.
for dev in /dev/vd[b-z]; do
  [ -b "$dev" ] || continue
  if mount -t iso9660 -o ro "$dev" /run/cidata 2>/dev/null; then
    if [ -f /run/cidata/meta-data ]; then break; fi
    umount /run/cidata
  fi
done
if [ ! -f /run/cidata/salvus.env ]; then
  echo "salvus: no config drive found" > /dev/console
  exit 1
fi
cp /run/cidata/salvus.env /run/salvus/env
. /run/salvus/env
hostname "$SALVUS_HOSTNAME"
echo "$SALVUS_HOSTNAME" > /etc/hostname
ip link set lo up
if [ -n "$SALVUS_NET_ADDRESS" ]; then
  # network: site: the address the host leased, on one link (no gateway), at the overlay's MTU.
  echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
  ip link set eth0 mtu "$SALVUS_NET_MTU"
  ip link set eth0 up
  ip addr add "$SALVUS_NET_ADDRESS" dev eth0
else
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
mkdir -p /root/.ssh && chmod 700 /root/.ssh
if [ -f /run/cidata/authorized_keys ]; then
  cp /run/cidata/authorized_keys /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
fi
printf '%s\n' $SALVUS_UPSTREAMS > /run/salvus/upstreams
# SSH: a host key of this VM's own (none is baked into the image; ed25519 takes milliseconds even
# under TCG), which the channel reports to the host before READY (HOSTKEY, HOSTKEYS-DONE).
mkdir -p /etc/dropbear
dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1
# Persistent disks: the host sets each disk's virtio serial to its name; format on first use.
for entry in $SALVUS_DISKS; do
  name="${entry%%:*}"; mnt="${entry#*:}"
  for s in /sys/block/vd*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = "$name" ] || continue
    dev="/dev/$(basename "$(dirname "$s")")"
    mkdir -p "$mnt"
    if ! mount -t ext4 "$dev" "$mnt" 2>/dev/null; then
      echo "salvus: formatting persistent disk $name ($dev)" > /dev/console
      mke2fs -q -F -L "$name" "$dev" && mount -t ext4 "$dev" "$mnt"
    fi
  done
done
echo "$SALVUS_DISKS" > /run/salvus/disks
if [ -x "/etc/salvus/roles/$SALVUS_ROLE.boot" ]; then "/etc/salvus/roles/$SALVUS_ROLE.boot"; fi
acpid -c /etc/acpi -l /run/acpid.log
exit 0
