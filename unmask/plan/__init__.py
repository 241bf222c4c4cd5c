"""`unmask plan`: parameters, per-rank memory and throughput of parallel layouts before renting a cluster."""
