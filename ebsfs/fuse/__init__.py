"""The FUSE face: pyfuse3 Operations over the engine's file nodes, and the mount's
lifecycle."""
