"""Scheduler backends: one small class per scheduler (local, condor, pbs, slurm, drmaa)."""
