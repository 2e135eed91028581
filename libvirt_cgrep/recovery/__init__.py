"""Recovery: failover, test failover and cleanup, reverse protection, failback (docs/recovery.md)."""
