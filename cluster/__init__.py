"""The cluster spec (cluster.yaml) and the service registry."""
