"""`salvus-vmjob`: the process a scheduler runs; its life is one VM's life."""
