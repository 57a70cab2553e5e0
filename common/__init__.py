"""Test-time registers for medical imaging: the shared package behind the entry scripts."""
