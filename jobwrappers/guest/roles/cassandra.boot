#!/bin/sh
# cassandra (demo), at boot: count boots on the persistent disk so persistence shows from outside.
. /run/salvus/env
data="${SALVUS_DATA:-/data}"
n=$(cat "$data/boot-count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$data/boot-count.new" && mv "$data/boot-count.new" "$data/boot-count"
sync
# A second port, as a real node's gossip (config gossip_port: 7000), answering the same way.
if [ -n "$SALVUS_CONFIG_GOSSIP_PORT" ]; then
  nc -ll -p "$SALVUS_CONFIG_GOSSIP_PORT" -e /etc/salvus/roles/cassandra </dev/null >/dev/null 2>&1 &
fi
