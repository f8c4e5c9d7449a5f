#!/bin/sh
# Runs salvus-vmjob ("$@") under Grid Engine (through DRMAA) and maps its exit codes to SGE's
# policy: 75 (transient) -> 99 (SGE: requeue and run again); 65/78 (image or configuration
# error) -> 100 (SGE: job put in error state, held until an operator clears it); others as is.
# SIGTERM (from the queue's terminate_method or a notify) is passed on to the wrapper, which
# shuts its guest down cleanly; this shell then waits for it.
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT USR1 USR2
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
case $rc in
  75) exit 99 ;;
  65|78) echo "salvus: salvus-vmjob exited $rc (image/trust or configuration error): holding" >&2; exit 100 ;;
  *) exit "$rc" ;;
esac
