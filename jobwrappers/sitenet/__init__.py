"""The site network (`network: site`): per-host bridges joined by VXLAN, role-derived addresses and
the nftables rules that keep each role reachable only from the roles allowed to reach it."""
