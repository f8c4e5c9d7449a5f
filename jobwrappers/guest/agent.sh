#!/bin/sh
# salvus guest agent for real images (plain POSIX sh: no Python, no bash). The config drive's
# cloud-config installs it from `bootcmd` and starts it at once (cloud-init's first stage), with its
# settings in /etc/salvus/agent.env. It speaks the host-channel protocol on the virtio-serial port
# org.salvus.channel.0 (jobwrappers/agent.py is the host side):
#   guest -> host  READY ROLE SERVICE_ID        the role's port listens
#                  HOSTKEY TYPE BASE64          one per /etc/ssh/ssh_host_*_key.pub, once sshd listens
#                  HOSTKEYS-DONE                the host records the keys with the service
#                  CLOUD-INIT-FINAL             /var/lib/cloud/instance/boot-finished exists
#   host -> guest  UPSTREAMS HOST:PORT...       written atomically to /etc/salvus/upstreams, then
#                                               $SALVUS_RELOAD (roles.R.reload) is run
. /etc/salvus/agent.env

say() { echo "salvus-agent: $*" > /dev/console 2>/dev/null; }
nap() { sleep 0.2 2>/dev/null || sleep 1; }

port=/dev/virtio-ports/org.salvus.channel.0
if [ ! -e "$port" ]; then  # no udev symlink: find the port by its name in sysfs
  for n in /sys/class/virtio-ports/*/name; do
    [ -r "$n" ] && [ "$(cat "$n")" = "org.salvus.channel.0" ] && port="/dev/$(basename "$(dirname "$n")")"
  done
fi
tries=0
while [ ! -e "$port" ]; do  # the virtio_console module may still be loading
  tries=$((tries + 1))
  [ "$tries" -gt 300 ] && { say "no host channel org.salvus.channel.0"; exit 1; }
  nap
done

listening() {  # PORT: a TCP socket in state LISTEN (0A) on it, IPv4 or IPv6
  grep -q ":$(printf '%04X' "$1") [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

write_upstreams() {  # HOST:PORT...: only well-formed words, written by rename (never half a file)
  mkdir -p /etc/salvus
  : > /etc/salvus/upstreams.new
  for u in "$@"; do
    case "$u" in *[!A-Za-z0-9.:_-]*|'') continue ;; esac
    printf '%s\n' "$u" >> /etc/salvus/upstreams.new
  done
  mv -f /etc/salvus/upstreams.new /etc/salvus/upstreams
}

exec 3<>"$port"
set -f  # split the words below, never glob them
# shellcheck disable=SC2086
write_upstreams $SALVUS_UPSTREAMS
set +f

(  # READY once the role's service listens (the host bounds the wait: boot_timeout)
  while ! listening "$SALVUS_PORT"; do nap; done
  echo "READY $SALVUS_ROLE $SALVUS_SERVICE_ID" >&3
  say "READY $SALVUS_ROLE $SALVUS_SERVICE_ID"
) &

if command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; then
  (  # host keys once sshd listens: they exist then (sshd refuses to start without them)
    while ! listening 22; do sleep 1; done
    for f in /etc/ssh/ssh_host_*_key.pub; do
      [ -r "$f" ] || continue
      read -r ktype kblob _ < "$f" && echo "HOSTKEY $ktype $kblob" >&3
    done
    echo "HOSTKEYS-DONE" >&3
  ) &
fi

(  # cloud-init's final stage writes boot-finished last (readiness: cloud-init-final)
  command -v cloud-init >/dev/null 2>&1 || exit 0
  while [ ! -e /var/lib/cloud/instance/boot-finished ]; do sleep 1; done
  echo "CLOUD-INIT-FINAL" >&3
) &

# A read while the host end is not connected returns end-of-file: wait and read again.
while :; do
  while read -r cmd args <&3; do
    case "$cmd" in
      UPSTREAMS)
        set -f  # words from the host are split, never globbed
        # shellcheck disable=SC2086
        write_upstreams $args
        set +f
        if [ -n "$SALVUS_RELOAD" ]; then
          sh -c "$SALVUS_RELOAD" </dev/null >/dev/null 2>&1 || say "reload failed: exit $?"
        fi
        ;;
    esac
  done
  sleep 1
done
