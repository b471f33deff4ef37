"""distill: datasets, networks, expert training straight to .ctraj, MCT/MTT distillation and evaluation."""
