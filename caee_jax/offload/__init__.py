"""Offloaded experts: expert stores (host RAM, disk) behind a fixed-slot device cache."""
