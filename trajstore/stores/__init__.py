"""Where the bytes of a store live and how they are published atomically."""
