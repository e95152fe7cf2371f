"""The LANDeRMT translation server: one base model, per-request routed language pairs."""
