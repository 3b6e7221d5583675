"""Load generation and limits for ``rnnserve bench`` (loopback only, bounded in time and count)."""
