# Slurm 22.05 (controller, node daemon, munge) and its PBS-compatible qsub/qstat/qdel wrappers,
# and OpenSSH's server: the tests' login node in front of this cluster (scheduler.login).
# Nothing is started or enabled here: the test fixtures run the daemons with private configs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install munge slurm-wlm slurmctld slurmd slurm-client libslurm-perl libslurmdb-perl libswitch-perl \
  openssh-server
# The packaged PBS wrappers (slurm-wlm-torque) conflict with gridengine-client over /usr/bin/qsub,
# and the tests need both schedulers' clients; so the wrappers are unpacked beside, not installed.
# A PBS site using them sets `scheduler.bin_dir: /opt/salvus/slurm-torque/bin`.
torque=/opt/salvus/slurm-torque
if [ ! -x "$torque/bin/qsub" ]; then
  echo "    slurm: unpacking slurm-wlm-torque's qsub/qstat/qdel into $torque/bin"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"
  (cd "$work" && apt-get download -q slurm-wlm-torque >/dev/null 2>&1 || {
     apt-get update -q >/dev/null && apt-get download -q slurm-wlm-torque >/dev/null; })
  dpkg-deb -x "$work"/slurm-wlm-torque_*.deb "$work/x"
  mkdir -p "$torque/bin"
  install -m 755 "$work"/x/usr/bin/q* "$work/x/usr/bin/pbsnodes" "$torque/bin/"
else
  echo "    slurm: PBS wrappers present in $torque/bin"
fi
# The wrappers run sbatch/scancel/... from their own directory.
for prog in sbatch salloc srun scancel squeue scontrol sinfo; do
  ln -sfn "/usr/bin/$prog" "$torque/bin/$prog"
done
# The packages' init scripts may have started daemons with the stock config; the project never uses
# those, so stop them (by their pid files only) when they are running.
for pidfile in /run/slurmctld.pid /run/slurmd.pid /run/munge/munged.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "    slurm: stopping the packaged daemon from $pidfile"
    kill "$(cat "$pidfile")" || true
  fi
done
