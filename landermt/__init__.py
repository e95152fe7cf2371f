"""LANDeRMT: detect language-aware FFN layers and neurons, finetune them selectively, route them
per request (Zhu et al., ACL 2024)."""

__version__ = "0.1.0"
