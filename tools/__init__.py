"""Developer tools that are not part of serving (nothing in spyre_backend imports them)."""
