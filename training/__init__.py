"""QR-head detection and the QR-head LoRA fine-tune (issue: training). Not built yet."""
