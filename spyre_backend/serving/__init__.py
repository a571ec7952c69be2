"""What the Triton models call: one service object per model, plus Triton I/O helpers."""
