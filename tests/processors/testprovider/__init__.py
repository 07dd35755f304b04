"""Test-only processors, found as `processors.testprovider.*` through the `PROCESSOR_DIRS` setting."""
