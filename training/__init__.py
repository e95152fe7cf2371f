"""The LANDeRMT training pipeline: detect → score → partition → finetune → evaluate."""
