"""Tests of lmforge.cluster on a local Ray cluster (a package, so that its package-scoped
Ray fixture is torn down after these tests rather than at the end of the session)."""
