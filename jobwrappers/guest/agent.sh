#!/bin/sh
# salvus guest agent for real images (plain POSIX sh: no Python, no bash). The config drive's
# cloud-config installs it from `bootcmd` and starts it at once (cloud-init's first stage), with its
# settings in /etc/salvus/agent.env. It speaks the host-channel protocol on the virtio-serial port
# org.salvus.channel.0 (jobwrappers/agent.py is the host side):
#   guest -> host  READY ROLE SERVICE_ID        the role's port listens
#                  HOSTKEY TYPE BASE64          per ed25519/ecdsa/rsa host key, once sshd listens
#                  HOSTKEYS-DONE                the host records the keys with the service
#                  CLOUD-INIT-FINAL             /var/lib/cloud/instance/boot-finished exists
#   host -> guest  UPSTREAMS HOST:PORT...       written atomically to /etc/salvus/upstreams, then
#                                               $SALVUS_RELOAD (roles.R.reload) is run
# One process writes to the channel (report) and one reads from it (serve_host), so no two lines
# interleave. Waiting is polling: under TCG each fork+exec costs the booting guest tens of ms of CPU,
# so the poll loop uses shell builtins only, apart from one `sleep` per round.

CHANNEL_NAME=org.salvus.channel.0
KEY_TYPES="ed25519 ecdsa rsa"  # what the host accepts; cloud-init also makes ssh-dss, not sent
SSH_PORT_HEX=0016

say() { echo "salvus-agent: $*" > /dev/console 2>/dev/null; }
nap() { sleep "$1" 2>/dev/null || sleep 1; }

listening() {  # PORT_HEX (4 upper-case hex digits): a TCP socket in state LISTEN (0A) on it
  for table in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$table" ] || continue
    while read -r _ local _ state _; do
      case "$local" in *":$1") [ "$state" = 0A ] && return 0 ;; esac
    done < "$table"
  done
  return 1
}

write_upstreams() {  # HOST:PORT...: only well-formed words, written by rename (never half a file)
  : > /etc/salvus/upstreams.new
  for u in "$@"; do
    case "$u" in *[!A-Za-z0-9.:_-]*|'') continue ;; esac
    printf '%s\n' "$u" >> /etc/salvus/upstreams.new
  done
  mv -f /etc/salvus/upstreams.new /etc/salvus/upstreams
}

find_channel() {  # the port's path; udev makes the by-name symlink, sysfs has the name without it
  channel=/dev/virtio-ports/$CHANNEL_NAME
  tries=0
  while [ ! -e "$channel" ]; do  # the virtio_console module may still be loading
    for n in /sys/class/virtio-ports/*/name; do
      [ -r "$n" ] && read -r name < "$n" && [ "$name" = "$CHANNEL_NAME" ] && {
        channel=${n%/name}; channel=/dev/${channel##*/}; }
    done
    [ -e "$channel" ] && break
    tries=$((tries + 1))
    [ "$tries" -gt 300 ] && { say "no host channel $CHANNEL_NAME"; return 1; }
    nap 0.2
  done
}

send_host_keys() {
  for t in $KEY_TYPES; do
    f=/etc/ssh/ssh_host_${t}_key.pub
    [ -r "$f" ] && read -r ktype kblob _ < "$f" && echo "HOSTKEY $ktype $kblob" >&3
  done
  echo "HOSTKEYS-DONE" >&3
}

report() {  # the only writer on fd 3; the host bounds the whole wait (boot_timeout)
  ready="" keys="" final=""
  [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || keys=none
  command -v cloud-init >/dev/null 2>&1 || final=none
  role_hex=$(printf '%04X' "$SALVUS_PORT")
  while :; do
    if [ -z "$ready" ] && listening "$role_hex"; then
      echo "READY $SALVUS_ROLE $SALVUS_SERVICE_ID" >&3
      say "READY $SALVUS_ROLE $SALVUS_SERVICE_ID"
      ready=1
    fi
    if [ -z "$keys" ] && listening "$SSH_PORT_HEX"; then  # sshd refuses to start without its keys
      send_host_keys
      keys=1
    fi
    if [ -z "$final" ] && [ -e /var/lib/cloud/instance/boot-finished ]; then
      echo "CLOUD-INIT-FINAL" >&3
      final=1
    fi
    [ -n "$ready" ] && [ -n "$keys" ] && [ -n "$final" ] && return 0
    if [ -n "$ready" ] && [ -n "$keys" ]; then nap 2; else nap 0.5; fi
  done
}

serve_host() {  # reads fd 3; a read while the host end is not connected is end-of-file: read again
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
    nap 1
  done
}

main() {
  . /etc/salvus/agent.env
  find_channel || exit 1
  mkdir -p /etc/salvus
  exec 3<>"$channel"
  set -f  # split the words below, never glob them
  # shellcheck disable=SC2086
  write_upstreams $SALVUS_UPSTREAMS
  set +f
  serve_host &
  report
  wait
}

# Run when executed (sh /usr/local/sbin/salvus-agent); sourcing it (a test) only defines the functions.
case "${0##*/}" in salvus-agent|agent.sh) main ;; esac
