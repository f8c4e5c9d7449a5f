"""`imgdist`: hypervisors pull approved images as a swarm, verify them, and advertise them."""
