"""The leaf of the MoE: routing operations every stage shares (no project imports above `config`)."""
