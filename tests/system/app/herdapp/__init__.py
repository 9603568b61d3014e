"""A small application whose tasks run under the hardened taskherd unit."""
