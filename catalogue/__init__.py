"""The signed image catalogue: endorse, approve, verify, publish."""
