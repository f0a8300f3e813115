"""Context compression: units, the QR-head scorer, the selection policy."""
