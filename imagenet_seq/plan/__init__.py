"""The epoch plan: which records a rank reads and in which order (``order``), the bounded shuffle
buffer (``shuffle``), and rank / world size (``distributed``). Pure functions of the arguments."""
