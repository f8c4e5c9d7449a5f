#!/bin/sh
# Runs salvus-vmjob ("$@") under Grid Engine (through DRMAA) and maps its exit codes to SGE's
# policy: 75 (transient) -> 99 (SGE: requeue and run again); 65/78 (image or configuration
# error) -> a user hold, then 99, so the job waits requeued and held (hqw) until an operator
# fixes the cause and runs qrls (SGE's own exit 100 only marks the job failed here); others as is.
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
  65|78)
    echo "salvus: salvus-vmjob exited $rc (image/trust or configuration error): holding job $JOB_ID" >&2
    qhold "$JOB_ID" >/dev/null 2>&1 && exit 99
    exit 100 ;;
  *) exit "$rc" ;;
esac
