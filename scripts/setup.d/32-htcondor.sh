# HTCondor 23.9 for the test pool: Debian 12 has no package, so a Debian 13 root made with
# debootstrap holds it (and QEMU, Python 3.13 and salvus-jobs' execute-node dependencies: the pool's
# execute nodes run the jobs inside it). Cached as /var/cache/salvus/condor/root and rebuilt only when
# this recipe changes; built beside it and renamed into place, so a failed build leaves nothing half
# made. The test fixtures (tests/fixtures/condor.py) start the daemons and install the current
# salvus-jobs into it (scripts/install-execute-node). How to start the pool by hand: docs/htcondor.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install debootstrap
cache=/var/cache/salvus/condor
# The job user: the same name and ids here and inside the root (the tests submit as it). Here
# first, even when the root is up to date: a cached root is no use without it.
getent group salvus >/dev/null || groupadd --system salvus
getent passwd salvus >/dev/null || useradd --system -g salvus --no-create-home -s /usr/sbin/nologin salvus
want=$(sha256sum "$0" scripts/install-execute-node | sha256sum | cut -c1-16)
if [ -f "$cache/root/.salvus-recipe" ] && [ "$(cat "$cache/root/.salvus-recipe")" = "$want" ]; then
  echo "    htcondor: root up to date ($cache/root, recipe $want)"; exit 0
fi
mkdir -p "$cache"
new=$(mktemp -d "$cache/build.XXXXXX")
# Paths mounted at or under $1 (a root a pool left mounted must not be removed through its mounts).
mounted_under() { awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts; }
cleanup() {
  for m in proc sys dev; do mountpoint -q "$new/root/$m" && umount -l "$new/root/$m"; done
  [ -z "$(mounted_under "$new")" ] && rm -rf --one-file-system "$new"
}
trap cleanup EXIT
echo "    htcondor: debootstrap trixie into $new/root"
debootstrap --variant=minbase --include=ca-certificates trixie "$new/root" http://deb.debian.org/debian >/dev/null
for m in proc sys dev; do mount --bind "/$m" "$new/root/$m"; done
cp /etc/resolv.conf "$new/root/etc/resolv.conf"
# The root trusts what this machine trusts (a site CA or an egress proxy's).
cp /usr/local/share/ca-certificates/*.crt "$new/root/usr/local/share/ca-certificates/" 2>/dev/null || true
in_root() { chroot "$new/root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive "$@"; }
in_root update-ca-certificates >/dev/null
echo "    htcondor: installing condor, qemu and python3 in the root"
# condor's postinst asks systemctl for its service: there is none in a root (a warning, not a failure).
in_root apt-get install -y -q --no-install-recommends condor qemu-system-x86 qemu-utils python3-venv \
  iproute2 procps genisoimage e2fsprogs util-linux >"$new/apt.log" 2>&1 || { tail -20 "$new/apt.log" >&2; exit 1; }
in_root groupadd -g "$(id -g salvus)" salvus
in_root useradd -u "$(id -u salvus)" -g salvus -M -s /usr/sbin/nologin salvus
# Execute-node dependencies now (cached), salvus-jobs itself at each pool start.
in_root python3 -m venv /opt/salvus-jobs
src=$(mktemp -d "$new/root/var/tmp/src.XXXXXX")
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$src" -xf -
in_root /opt/salvus-jobs/bin/python -m pip install -q --disable-pip-version-check setuptools
in_root bash "/var/tmp/$(basename "$src")/scripts/install-execute-node" --prefix /opt/salvus-jobs --extras condor "/var/tmp/$(basename "$src")" >/dev/null
rm -rf "$src"
in_root apt-get clean
echo "$want" > "$new/root/.salvus-recipe"
for m in proc sys dev; do umount -l "$new/root/$m"; done
if [ -n "$(mounted_under "$cache/root")" ]; then
  echo "setup: $cache/root still has mounts (a test pool running?): $(mounted_under "$cache/root" | tr '\n' ' ')" >&2
  exit 75
fi
if [ -d "$cache/root" ]; then mv "$cache/root" "$new/old"; fi
mv "$new/root" "$cache/root"
echo "    htcondor: root ready ($cache/root, $(du -sh --one-file-system "$cache/root" | cut -f1))"
