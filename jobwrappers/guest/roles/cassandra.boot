#!/bin/sh
# cassandra (demo), at boot: count boots on the persistent disk so persistence shows from outside.
. /run/salvus/env
data="${SALVUS_DATA:-/data}"
n=$(cat "$data/boot-count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$data/boot-count.new" && mv "$data/boot-count.new" "$data/boot-count"
sync
