"""The soak: random kills, restarts and connection drops under steady traffic."""
